"""Kernel dispatch: mode parsing, CPU behaviour, and the per-shape decision cache."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlxgen.errors import ConfigError
from mlxgen.backends.metal import (KernelDispatch, RopeParams, bench_kernels, choose_decode,
                                   choose_rope, decode_attention_composition,
                                   decode_attention_prerope, format_table, fused_rope,
                                   get_dispatch, main, microbenchmark, plan_decode, resolve_mode,
                                   rope_composition, unavailable_reason)

on_cpu = pytest.mark.skipif(unavailable_reason() is None, reason="runs where kernels cannot (CPU)")
ROPE = RopeParams(64, base=10000.0)


def refusing_factory(**kw):
    raise AssertionError(f"kernel {kw['name']} was built although dispatch chose the composition")


class FakeKernels:
    """A factory whose 'kernels' return zeros, so a result shows which path produced it."""

    def __init__(self):
        self.launched: list[str] = []

    def __call__(self, **kw):
        def run(*, output_shapes, output_dtypes, **_):
            self.launched.append(kw["name"])
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("MLXGEN_KERNELS", raising=False)
    assert resolve_mode() == "auto"
    for mode in ("auto", "off", "on"):
        monkeypatch.setenv("MLXGEN_KERNELS", mode)
        assert resolve_mode() == mode
    assert resolve_mode("off") == "off"  # the argument wins
    monkeypatch.setenv("MLXGEN_KERNELS", "fast")
    with pytest.raises(ConfigError, match="MLXGEN_KERNELS"):
        resolve_mode()
    with pytest.raises(ConfigError, match="kernels must be one of auto, off, on"):
        resolve_mode("yes")


@on_cpu
def test_auto_on_cpu_uses_the_composition(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXGEN_KERNELS", raising=False)
    d = KernelDispatch(factory=refusing_factory, path=tmp_path / "d.json")
    assert d.mode == "auto" and not d.enabled and "Metal" in d.reason
    q, k = mx.random.normal((1, 4, 2, 64)), mx.random.normal((1, 2, 2, 64))
    got = fused_rope(q, k, ROPE, 3, dispatch=d)
    want = rope_composition(q, k, ROPE, 3)
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    kc, vc = mx.random.normal((1, 2, 40, 64)), mx.random.normal((1, 2, 40, 64))
    out = decode_attention_prerope(q, kc, vc, 33, ROPE, 0.125, dispatch=d)
    assert mx.array_equal(out, decode_attention_composition(q, kc, vc, 33, ROPE, 0.125)).item()
    assert not (tmp_path / "d.json").exists()  # nothing benchmarked, nothing recorded
    assert not get_dispatch().enabled


@on_cpu
@pytest.mark.parametrize("how", ["argument", "env"])
def test_forced_on_without_a_gpu_is_a_clear_error(monkeypatch, how):
    monkeypatch.delenv("MLXGEN_KERNELS", raising=False)
    if how == "env":
        monkeypatch.setenv("MLXGEN_KERNELS", "on")
    with pytest.raises(ConfigError, match=r"(kernels='on'|MLXGEN_KERNELS=on) forces custom kernels, but .*Metal"):
        get_dispatch("on" if how == "argument" else None)
    with pytest.raises(ConfigError, match="forces custom kernels"):
        fused_rope(mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)), ROPE,
                   kernels="on" if how == "argument" else None)


def test_off_never_builds_a_kernel(tmp_path):
    d = KernelDispatch("off", available=True, factory=refusing_factory, path=tmp_path / "d.json")
    q = mx.random.normal((1, 2, 1, 64))
    fused_rope(q, q, ROPE, 0, dispatch=d)
    decode_attention_prerope(q, mx.zeros((1, 2, 8, 64)), mx.zeros((1, 2, 8, 64)), 8, ROPE, 1.0,
                             dispatch=d)


def test_decisions_are_cached_per_shape_and_device(tmp_path):
    path, calls = tmp_path / "decisions.json", []

    def bench(kernel, composition):
        calls.append(1)
        return {"use_kernel": len(calls) == 1, "kernel_us": 1.0, "composition_us": 2.0, "note": ""}

    fake = FakeKernels()
    d = KernelDispatch("auto", available=True, factory=fake, bench=bench, path=path, device="GPU A|mlx 1")
    q = mx.random.normal((1, 4, 1, 64))
    kc = mx.random.normal((1, 2, 2048, 64))

    def decide(n, disp=d):  # what the backend does at load, per context bucket
        return choose_decode(disp, q.shape, 2, n, ROPE, 0.125, q.dtype, kc.dtype)

    def step(n, disp=d):  # a decode step: looks the decision up, never times
        return decode_attention_prerope(q, kc, kc, n, ROPE, 0.125, dispatch=disp)

    assert not mx.array_equal(step(300), mx.zeros_like(q)).item()  # undecided: composition
    assert calls == [] and fake.launched == []
    assert decide(300) is True and len(calls) == 1  # bucket 512: kernel wins
    assert mx.array_equal(step(300), mx.zeros_like(q)).item()
    assert fake.launched == ["mlxgen_attn_decode_prerope"]
    decide(500)  # same power-of-two bucket (512): no new benchmark
    assert len(calls) == 1
    assert decide(600) is False and len(calls) == 2  # bucket 1024: composition
    assert not mx.array_equal(step(600), mx.zeros_like(q)).item()
    saved = json.loads(path.read_text())["GPU A|mlx 1"]
    assert sorted(v["use_kernel"] for v in saved.values()) == [False, True]
    assert all(k.startswith("decode_prerope|B1-Hq4-Hk2-Lq1-D64-n") for k in saved)

    again = KernelDispatch("auto", available=True, factory=fake, bench=bench, path=path, device="GPU A|mlx 1")
    decide(400, again)
    assert len(calls) == 2  # loaded from disk
    other = KernelDispatch("auto", available=True, factory=fake, bench=bench, path=path, device="GPU B|mlx 1")
    decide(400, other)
    assert len(calls) == 3 and set(json.loads(path.read_text())) == {"GPU A|mlx 1", "GPU B|mlx 1"}


def test_benchmark_thunks_time_only_the_op(tmp_path):
    # Inputs are made and evaluated before timing: the thunks the benchmark gets create nothing.
    seen = []

    def bench(kernel, composition):
        before = mx.get_active_memory()
        for _ in range(3):
            mx.eval(composition())
        seen.append(mx.get_active_memory() - before)
        return {"use_kernel": False, "kernel_us": 1.0, "composition_us": 1.0, "note": ""}

    d = KernelDispatch("auto", available=True, factory=FakeKernels(), bench=bench, path=tmp_path / "d.json")
    choose_decode(d, (1, 4, 1, 64), 2, 1000, ROPE, 0.125, mx.float32, mx.float32)
    choose_rope(d, (1, 4, 100, 64), 2, ROPE, mx.float32, mx.float32, mx.float32)
    assert len(seen) == 2 and all(grown < 1 << 20 for grown in seen)


def test_forced_on_with_a_kernel_backend_skips_benchmarks_and_unsupported_shapes(tmp_path):
    fake = FakeKernels()
    d = KernelDispatch("on", available=True, factory=fake, path=tmp_path / "d.json",
                       bench=lambda *a: pytest.fail("'on' must not benchmark"))
    fused_rope(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)), ROPE, 0, dispatch=d)
    long_chunk = mx.random.normal((1, 2, 16, 64))  # 16 queries: beyond the decode kernel
    out = decode_attention_prerope(long_chunk, long_chunk, long_chunk, 16, ROPE, 0.125, dispatch=d)
    assert fake.launched == ["mlxgen_rope"]
    assert mx.allclose(out, decode_attention_composition(long_chunk, long_chunk, long_chunk, 16, ROPE, 0.125)).item()


def test_microbenchmark_refuses_a_wrong_kernel_and_prefers_the_faster():
    a = mx.random.normal((256, 256))
    right, wrong = (lambda: a + 1), (lambda: a + 2)
    r = microbenchmark(wrong, right, iters=2, rounds=1)
    assert r["use_kernel"] is False and "disagrees" in r["note"]

    def slow():
        x = a
        for _ in range(20):
            x = (x @ a) * 1e-3
        return x * 0 + a + 1

    assert microbenchmark(right, slow, iters=3, rounds=2)["use_kernel"] is True
    assert microbenchmark(slow, right, iters=3, rounds=2)["use_kernel"] is False


@pytest.mark.parametrize("B,Hk,G,Lq,n", [(1, 8, 4, 1, 1), (1, 8, 4, 1, 5000), (1, 1, 7, 8, 300),
                                         (2, 2, 7, 3, 131), (1, 32, 1, 1, 100000)])
def test_decode_plan_covers_every_key_and_row(B, Hk, G, Lq, n):
    p = plan_decode(B, Hk, G, Lq, n)
    assert p.rows in (1, 2, 4, 8) and p.rows * p.tiles >= G * Lq > p.rows * (p.tiles - 1)
    assert p.keys_per_split % 32 == 0 and (p.splits - 1) * p.keys_per_split < n <= p.splits * p.keys_per_split


@on_cpu
def test_bench_table_on_cpu(capsys):
    rows = bench_kernels(shapes=[("tiny", 1, 4, 2, 1, 64)], keys=[64])
    assert [r["op"] for r in rows] == ["decode_prerope", "rope"]
    assert all(r["kernel_us"] is None and r["composition_us"] > 0 and not r["use_kernel"] for r in rows)
    assert "n/a" in format_table(rows)
    assert main(["--keys", "32"]) == 0
    out = capsys.readouterr().out
    assert "only the MLX composition is timed" in out and "decode_prerope" in out
