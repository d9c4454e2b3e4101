"""Tiny random models of every architecture for the K/V-reuse tests (cache modes, chunk store,
sessions, recompute)."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxgen.models import model_from_config

VOCAB = 256
BASE = dict(
    hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, rope_theta=10000.0,
    max_position_embeddings=2048,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ARCHS = {
    "llama": dict(BASE, model_type="llama"),
    "llama3-rope": dict(BASE, model_type="llama", rope_theta=500000.0, rope_scaling=LLAMA3),
    "linear-rope": dict(BASE, model_type="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    "mistral": dict(BASE, model_type="mistral", rope_theta=1e6),
    "smollm2": dict(BASE, model_type="llama", hidden_size=96, num_attention_heads=3,
                    num_key_value_heads=1, rope_theta=1e5, tie_word_embeddings=True),
    "qwen2": dict(BASE, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1]),
}

# More architectures for the tests that cover every one (test_reuse_quality), kept out of ARCHS,
# which test_cache_modes runs everything on.
MORE_ARCHS = {
    "gemma2": dict(BASE, model_type="gemma2", head_dim=32, query_pre_attn_scalar=24,
                   sliding_window=16),
    "phi3": dict(BASE, model_type="phi3"),
}


def tiny_model(arch: str = "llama", seed: int = 0, scale: float = 0.2, **overrides):
    """A model of `arch` with non-trivial random weights (norms 1 + noise, the rest noise)."""
    model = model_from_config(dict({**ARCHS, **MORE_ARCHS}[arch], **overrides))
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (name, p), key in zip(params, keys):
        noise = scale * mx.random.normal(p.shape, key=key)
        new.append((name, (1.0 + noise) if name.endswith("norm.weight") else noise))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    model.eval()
    return model


def token_ids(n: int, seed: int = 0) -> list[int]:
    return mx.random.randint(0, VOCAB, (n,), key=mx.random.key(seed)).tolist()


def max_diff(a: mx.array, b: mx.array) -> float:
    """max |a - b| relative to the reference's scale (max(1, max |b|)): float32 round-off in
    logits of magnitude ~7 from 4 random layers reaches ~1e-4 absolute between chunkings."""
    assert a.shape == b.shape, f"{a.shape} vs {b.shape}"
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1.0)).item()
