"""Model hyper-parameters read from config.json, in both layouts found in the wild."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_freq_factors: list[float] | None = None  # llama.cpp's rope_freqs tensor (GGUF)
    rope_traditional: bool = False
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    # Mixture of experts (Qwen3-MoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); the config is inconsistent."
            )

    def is_moe_layer(self, idx: int) -> bool:
        return (
            self.num_experts > 0
            and idx not in self.mlp_only_layers
            and (idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict: top-level rope_theta/rope_scaling or transformers>=5
        `rope_parameters`; `num_local_experts` accepted for `num_experts`."""
        if not isinstance(config, dict):
            raise ModelLoadError("config.json must hold a JSON object; re-download the model.")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; mlxgen supports: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise ModelLoadError(
                f"config.json lacks required keys {missing}; the file is incomplete or not a "
                "transformers config. Re-download the model."
            )
        rope_theta, rope_scaling = _rope_settings(config)
        kw: dict[str, Any] = {
            k: config[k] for k in cls.__dataclass_fields__ if k in config and config[k] is not None
        }
        kw.update(model_type=model_type, rope_theta=rope_theta, rope_scaling=rope_scaling)
        if "num_local_experts" in config and "num_experts" not in config:
            kw["num_experts"] = config["num_local_experts"]
        if model_type == "qwen2":
            kw["attention_bias"] = True
        if model_type in ("qwen3", "qwen3_moe"):
            kw["qk_norm"] = True
        if model_type == "llama" and config.get("attention_bias"):
            kw["o_proj_bias"] = True  # Llama's attention_bias covers all four projections
        if model_type != "qwen3_moe":
            kw["num_experts"] = 0
        try:
            return cls(**kw)
        except TypeError as e:
            raise ModelLoadError(f"config.json has a value of the wrong type: {e}") from None


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    params = config.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    return float(theta), (scaling or None)
