"""Model hyper-parameters read from config.json, in both layouts found in the wild."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gemma3", "phi3",
)
LAYER_TYPES = ("full_attention", "sliding_attention")

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
    partial_rotary_factor: float = 1.0  # share of each head's features that RoPE rotates (Phi)
    # Sliding windows: layer i attends to the last `sliding_window` tokens where layer_types[i]
    # is "sliding_attention" (filled in from each family's own config keys by from_config).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # Gemma
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (else head_dim's)
    rope_local_base_freq: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    attn_logit_softcapping: float | None = None  # scores -> c tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None
    hidden_activation: str | None = None
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

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window, None for a layer that sees every earlier token."""
        types = self.layer_types or ["full_attention"] * self.num_hidden_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in types]

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
        if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
            # The multimodal layout: the text decoder's settings are under text_config.
            config = {**config["text_config"], "model_type": "gemma3_text",
                      "tie_word_embeddings": config.get("tie_word_embeddings", True)}
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
        if model_type == "gemma3":
            raise ModelLoadError("a gemma3 config needs a text_config object; the config is incomplete.")
        rope_theta, rope_scaling, local_base, partial = _rope_settings(config)
        kw: dict[str, Any] = {
            k: config[k] for k in cls.__dataclass_fields__ if k in config and config[k] is not None
        }
        kw.update(model_type=model_type, rope_theta=rope_theta, rope_scaling=rope_scaling)
        if partial is not None:
            kw["partial_rotary_factor"] = partial
        if local_base is not None:
            kw["rope_local_base_freq"] = local_base
        kw["layer_types"] = _layer_types(config, model_type)
        if model_type.startswith("gemma"):
            kw.setdefault("tie_word_embeddings", True)
            kw.setdefault("head_dim", 256)
            kw.setdefault("query_pre_attn_scalar", kw.get("head_dim", 256))
            kw.setdefault("hidden_activation", "gelu_pytorch_tanh")
        if model_type == "gemma3_text":
            kw["qk_norm"] = True
            kw.setdefault("rope_local_base_freq", 10000.0)
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
        if kw["layer_types"] and "sliding_attention" in kw["layer_types"]:
            window = kw.get("sliding_window")
            if not isinstance(window, int) or window < 1:
                raise ModelLoadError(
                    f"the config has sliding-window layers but sliding_window is {window!r}; it "
                    "must be a positive token count. The config is incomplete."
                )
        try:
            return cls(**kw)
        except TypeError as e:
            raise ModelLoadError(f"config.json has a value of the wrong type: {e}") from None


def _layer_types(config: dict, model_type: str) -> list[str] | None:
    """Which layers attend through a sliding window, from each family's way of saying it."""
    n = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types is not None:
        if len(types) != n or any(t not in LAYER_TYPES for t in types):
            raise ModelLoadError(
                f"layer_types must list one of {LAYER_TYPES} per layer ({n}); got {types!r}."
            )
        return list(types)
    if model_type == "gemma2":  # even layers local, odd ones global
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if model_type == "gemma3_text":  # every `sliding_window_pattern`-th layer global
        pattern = config.get("sliding_window_pattern") or 6
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if not config.get("use_sliding_window"):
            return None
        first = config.get("max_window_layers", n)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if config.get("sliding_window") is not None:  # Mistral v0.1, Phi-3: every layer
        return ["sliding_attention"] * n
    return None


def _rope_settings(config: dict) -> tuple[float, dict | None, float | None, float | None]:
    """(base, scaling of the global layers, base of the local layers, partial rotary factor)."""
    params = config.get("rope_parameters")
    local_base = config.get("rope_local_base_freq")
    if isinstance(params, dict) and "full_attention" in params:  # transformers >= 5, per layer kind
        local = params.get("sliding_attention") or {}
        local_base = local.get("rope_theta", local_base)
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError("RoPE scaling on sliding-window layers is not supported.")
        params = params["full_attention"]
    if isinstance(params, dict):  # transformers >= 5
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    partial = scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    elif "original_max_position_embeddings" in config:  # Phi-3 keeps it at the top level
        scaling.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    return float(theta), (scaling or None), local_base, partial
