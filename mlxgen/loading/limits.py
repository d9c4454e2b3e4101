"""Bounds on every count and dimension a model file declares, checked before anything is built.

A model file is untrusted input: a config.json or GGUF header can claim 10**6 layers or a 2**31
hidden size, and building that model first would take minutes and gigabytes before any check
fails. Here each hyper-parameter is type- and range-checked, then matched against the shapes in
the weight file's own tensor index, so what gets built is never larger than what the file holds."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ..errors import ModelLoadError

MAX_LAYERS = 4096
MAX_DIM = 1 << 20  # hidden / intermediate sizes
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 30
MAX_EXPERTS = 1 << 12

# field: (lowest, highest); every field is optional here (the model classes require theirs).
INT_FIELDS = {
    "hidden_size": (1, MAX_DIM), "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS), "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM), "vocab_size": (1, MAX_VOCAB),
    "intermediate_size": (0, 8 * MAX_DIM), "max_position_embeddings": (1, MAX_CONTEXT),
    "num_experts": (0, MAX_EXPERTS), "num_local_experts": (0, MAX_EXPERTS),
    "num_experts_per_tok": (0, MAX_EXPERTS), "moe_intermediate_size": (0, 8 * MAX_DIM),
    "decoder_sparse_step": (1, MAX_LAYERS),
}
FLOAT_FIELDS = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (0.0, math.inf)}
TYPED_FIELDS = {  # field: (allowed types, what to say)
    "model_type": (str, "a string"), "rope_scaling": (dict, "an object"),
    "rope_parameters": (dict, "an object"), "quantization": (dict, "an object"),
    "quantization_config": (dict, "an object"), "tie_word_embeddings": (bool, "true or false"),
    "attention_bias": (bool, "true or false"), "mlp_bias": (bool, "true or false"),
    "norm_topk_prob": (bool, "true or false"), "mlp_only_layers": (list, "a list of layer numbers"),
    "rope_freq_factors": (list, "a list of numbers"),
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _bad(source: str, field: str, names: Mapping[str, str], why: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {names.get(field, field)} {why}; the file is corrupt or not "
                          "a model mlxgen can run. Re-download or re-convert it.")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: Mapping[str, Any], source: str,
                 names: Mapping[str, str] | None = None) -> None:
    """Types and ranges of the hyper-parameters in an HF-style config dict. names maps a field to
    the name the file uses for it (a GGUF key), for the message."""
    names = names or {}
    if not isinstance(config, Mapping):
        raise ModelLoadError(f"{source}: the config must be a JSON object; re-download the model.")
    for field, (kinds, what) in TYPED_FIELDS.items():
        value = config.get(field)
        if value is not None and not isinstance(value, kinds):
            raise _bad(source, field, names, f"must be {what}, got {value!r}")
    if not all(is_int(i) for i in config.get("mlp_only_layers") or []):
        raise _bad(source, "mlp_only_layers", names, "must hold layer numbers")
    for field in ("rope_scaling", "rope_parameters"):
        for key, value in (config.get(field) or {}).items():
            if key in ("factor", "low_freq_factor", "high_freq_factor", "rope_theta",
                       "original_max_position_embeddings") and not _positive_number(value):
                raise _bad(source, f"{field}.{key}", names, f"must be a positive number, got "
                           f"{value!r}")
    for field, (lo, hi) in INT_FIELDS.items():
        value = config.get(field)
        if value is None:
            continue
        if not is_int(value):
            raise _bad(source, field, names, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise _bad(source, field, names, f"is {value}, outside [{lo}, {hi}]")
    for field, (lo, hi) in FLOAT_FIELDS.items():
        value = config.get(field)
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise _bad(source, field, names, f"must be a number, got {value!r}")
        if not (lo < value < hi) or not math.isfinite(value):
            raise _bad(source, field, names, f"is {value}, outside ({lo}, {hi})")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise _bad(source, "num_attention_heads", names,
                   f"({heads}) is not a multiple of num_key_value_heads ({kv})")
    if config.get("head_dim") is None and config.get("hidden_size") and heads:
        if config["hidden_size"] % heads:
            raise _bad(source, "hidden_size", names,
                       f"({config['hidden_size']}) does not split into {heads} heads")


def _positive_number(value: Any) -> bool:
    return (value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_against_weights(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                          source: str, names: Mapping[str, str] | None = None) -> None:
    """The layer count and main dimensions of config agree with the weight file's tensor index
    (HF tensor names -> shapes), so building the model allocates no more than the file holds."""
    names = names or {}
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    n = config.get("num_hidden_layers")
    if n is not None and layers != set(range(n)):
        held = f"layers 0..{max(layers)} ({len(layers)} distinct)" if layers else "no layers"
        raise _bad(source, "num_hidden_layers", names, f"is {n} but the weights hold {held}")

    def expect(tensor: str, axis: int, want: int | None, field: str) -> None:
        shape = shapes.get(tensor)
        if want is None or shape is None:
            return
        if len(shape) <= axis or shape[axis] != want:
            raise _bad(source, field, names,
                       f"is {want} but tensor {tensor} has shape {tuple(shape)}")

    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    expect("model.embed_tokens.weight", 0, config.get("vocab_size"), "vocab_size")
    expect("model.norm.weight", 0, hidden, "hidden_size")
    if heads and head_dim:
        expect("model.layers.0.self_attn.q_proj.weight", 0, heads * head_dim, "num_attention_heads")
        expect("model.layers.0.self_attn.k_proj.weight", 0, kv * head_dim, "num_key_value_heads")
    if not config.get("num_experts"):
        expect("model.layers.0.mlp.up_proj.weight", 0, config.get("intermediate_size"),
               "intermediate_size")
