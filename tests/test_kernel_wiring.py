"""The Metal backend, with a simulated device: at load it times our kernels against MLX's
composition for the model's shapes, swaps in the kernel layers where they won, and makes the
pre-RoPE cache the default when the decode kernel won everywhere; a decode step never times.

No GPU here: the device is simulated by a dispatcher whose kernels run through the CPU emulator
of the very Metal sources (tools/metal_emulator) and whose benchmark is scripted."""

import mlx.core as mx
from build_tools import needs_gxx
from mlx.utils import tree_map

from mlxgen import backends
from mlxgen.backends.metal import KernelDispatch
from mlxgen.cache import KVCache, PreRopeKVCache
from mlxgen.models import model_from_config
from mlxgen.prefill import prefill

CONFIG = dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=96,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=128,
              max_position_embeddings=512, rope_theta=10000.0)
PROMPT, STEPS = list(range(5, 45)), [7, 9, 11, 13]


class Device:
    """A simulated Metal device: emulated kernels and a benchmark that says who wins."""

    def __init__(self, tmp_path, kernel_wins: bool):
        from metal_emulator import metal_kernel

        self.benched: list[int] = []
        self.launched: list[str] = []
        self.kernel_wins = kernel_wins

        def factory(**kw):
            kernel = metal_kernel(**kw)

            def run(**call):
                self.launched.append(kw["name"])
                return kernel(**call)
            return run

        def bench(kernel, composition):
            self.benched.append(1)
            k, c = (1.0, 2.0) if self.kernel_wins else (2.0, 1.0)
            return {"use_kernel": self.kernel_wins, "kernel_us": k, "composition_us": c, "note": ""}

        self.dispatch = KernelDispatch("auto", available=True, factory=factory, bench=bench,
                                       path=tmp_path / "decisions.json", device="Simulated M9|mlx")


def tiny_model():
    mx.random.seed(3)
    model = model_from_config(CONFIG)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters()))
    mx.eval(model.parameters())
    return model


def run(model, cache, on_step=None):
    """Logits of the prompt's last token and of each decode step."""
    logits = [prefill(model, PROMPT, cache, chunk_size=2048)]
    for t in STEPS:
        if on_step:
            on_step()
        logits.append(model(mx.array([[t]]), cache)[:, -1])
    return mx.concatenate(logits)


@needs_gxx
def test_winning_kernels_are_chosen_at_load_and_run_in_decode(tmp_path, monkeypatch):
    model = tiny_model()
    want = run(model, model.make_cache("standard"))  # plain MLX, post-RoPE: the reference
    device = Device(tmp_path, kernel_wins=True)
    monkeypatch.setattr(backends.metal, "get_dispatch", lambda: device.dispatch)
    runtime = backends.prepare(model, "metal")
    # Decided at load: decode for context buckets 256 and 512 (the model's context), and RoPE
    # for 1/2/4/8-row steps; the decode kernel won everywhere, so pre-RoPE is the default.
    assert len(device.benched) == 2 + 4
    assert runtime.cache_mode == "pre-rope" and runtime.backend == "metal"
    cache = model.make_cache()
    assert all(isinstance(c, PreRopeKVCache) for c in cache)
    benched = []
    got = run(model, cache, on_step=lambda: benched.append(len(device.benched)))
    assert mx.abs(got - want).max().item() < 1e-4
    # Each decode step ran the decode kernel (keys rotated in registers) in both layers, and
    # looked its decision up: nothing was timed during generation.
    assert device.launched.count("mlxgen_attn_decode_prerope") == 2 * len(STEPS)
    assert benched == [2 + 4] * len(STEPS) and len(device.benched) == 2 + 4
    # A standard cache rotates q and k together: the fused RoPE kernel. The 40-token prefill's
    # bucket is timed at its first use, before generation; decode steps were decided at load.
    device.launched.clear()
    benched.clear()
    got = run(model, model.make_cache("standard"), on_step=lambda: benched.append(len(device.benched)))
    assert mx.abs(got - want).max().item() < 1e-4
    assert benched == [2 + 4 + 1] * len(STEPS) and len(device.benched) == 2 + 4 + 1
    assert device.launched.count("mlxgen_rope") == 2 * (1 + len(STEPS))
    saved = device.dispatch.decisions()
    assert sum(k.startswith("decode_prerope|") for k in saved) == 2
    assert sum(k.startswith("rope|") for k in saved) == 4 + 1


@needs_gxx
def test_slower_kernels_are_refused(tmp_path, monkeypatch):
    model = tiny_model()
    want = run(model, model.make_cache("standard"))
    device = Device(tmp_path, kernel_wins=False)
    monkeypatch.setattr(backends.metal, "get_dispatch", lambda: device.dispatch)
    runtime = backends.prepare(model, "metal")
    assert runtime.cache_mode == "standard"
    assert type(model.make_cache()[0]) is KVCache
    got = run(model, model.make_cache())
    assert mx.abs(got - want).max().item() < 1e-4
    assert device.launched == []  # measured slower: never launched
    # Even in a pre-RoPE cache a decode step only looks the decision up (composition).
    run(model, model.make_cache("pre-rope"))
    assert device.launched == []


def test_on_the_cpu_the_metal_backend_is_mlx_ops_only():
    # What a Mac runs, minus our kernels (they need a Metal GPU): no layer is swapped.
    model = tiny_model()
    runtime = backends.prepare(model, "metal")
    assert runtime.cache_mode == "standard" and runtime.prefill_chunk_size == 2048
    assert runtime.clear_cache_between_chunks and runtime.wired_limit
    assert type(model.layers[0].self_attn).__name__ == "Attention"
