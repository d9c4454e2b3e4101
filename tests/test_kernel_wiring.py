"""The pre-RoPE cache hands decode steps to mlxgen.kernels when a dispatcher is enabled (Metal).

No GPU here: an enabled dispatcher is simulated and the kernel replaced by the kernels package's
own composition, so what is checked is the wiring (buffers, offsets, positions), end to end."""

import mlx.core as mx
import pytest
from mlx.utils import tree_map

import mlxgen.kernels as kernels
from mlxgen.kernels.reference import RopeParams, decode_attention_composition
from mlxgen.models import model_from_config

CONFIG = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=128,
              max_position_embeddings=512, rope_theta=10000.0)


class Enabled:
    enabled = True


def decode_logits(model, prompt, steps, mode):
    cache = [c for c in (model.make_cache() if mode == "standard" else _pre_rope(model))]
    logits = [model(mx.array(prompt)[None], cache)[:, -1]]
    for t in steps:
        logits.append(model(mx.array([[t]]), cache)[:, -1])
    return mx.concatenate(logits)


def _pre_rope(model):
    from mlxgen.cache import make_cache

    return make_cache(len(model.layers), "pre-rope")


def test_enabled_dispatch_routes_decode_through_kernels(monkeypatch):
    mx.random.seed(3)
    model = model_from_config(CONFIG)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters()))
    prompt, steps = list(range(5, 45)), [7, 9, 11, 13]
    want = decode_logits(model, prompt, steps, "standard")
    calls = []

    def fake_kernel(q, k_cache, v_cache, n_keys, rope, scale):
        calls.append((q.shape[2], n_keys, k_cache.shape[2]))
        return decode_attention_composition(q, k_cache, v_cache, n_keys, RopeParams.from_rope(rope), scale)

    monkeypatch.setattr(kernels, "get_dispatch", lambda *a: Enabled())
    monkeypatch.setattr(kernels, "decode_attention_prerope", fake_kernel)
    got = decode_logits(model, prompt, steps, "pre-rope")
    assert mx.abs(got - want).max().item() < 1e-4
    # The 40-token prompt is not a decode step; each of the 4 steps is, in both layers, and the
    # whole cache buffer (capacity >= keys) is passed with the right key count.
    assert [c[:2] for c in calls] == [(1, 41 + i) for i in range(4) for _ in range(2)]
    assert all(cap >= n for _, n, cap in calls)


def test_cpu_never_calls_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "decode_attention_prerope", lambda *a: pytest.fail("kernel called"))
    model = model_from_config(CONFIG)
    decode_logits(model, [1, 2, 3], [4, 5], "pre-rope")
