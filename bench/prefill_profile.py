"""Where prefill time goes on this backend, and what the CPU fast path buys.

    python bench/prefill_profile.py --model smollm2 --lengths 512,2048 --chunk-sizes 256,512,1024

1. Per-layer components for one chunk (matmuls, attention, SwiGLU, norms/RoPE) at each length,
   reference ops vs mlxgen/cpu_ops.py.
2. Whole prefill, interleaved run by run (median of --reps), per chunk size: MLX's ops, the fast
   path on MLX ops (MLXGEN_CPU_KERNELS=off), the fast path on mlxgen's C++ kernels.
Prints the machine, backend and BLAS so numbers can be compared only where they are comparable."""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

import mlxgen
from mlxgen import backends
from mlxgen.backends.cpu import ext
from mlxgen.backends.cpu import ops as cpu_ops
from mlxgen.backends.cpu.blas import blas_in_use
from mlxgen.info import matmul_gflops
from mlxgen.prefill import prefill


def timed(fn, reps: int = 5) -> float:
    mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def layer_components(args, chunk: int, context: int) -> dict[str, tuple[float, float]]:
    """(reference ms, fast ms) for one layer's pieces on random tensors of the model's shapes."""
    D, H, KV, HD, F = (args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                       args.head_dim, args.intermediate_size)
    x = mx.random.normal((1, chunk, D))
    w = [mx.random.normal(s) * 0.02 for s in ((H * HD, D), (KV * HD, D), (KV * HD, D), (D, H * HD), (F, D), (F, D), (D, F))]
    q, k, v = mx.random.normal((1, H, chunk, HD)), mx.random.normal((1, KV, context, HD)), mx.random.normal((1, KV, context, HD))
    g, u = mx.random.normal((1, chunk, F)), mx.random.normal((1, chunk, F))
    mx.eval(x, q, k, v, g, u, *w)
    scale = HD**-0.5
    matmuls = lambda: [x @ w[0].T, x @ w[1].T, x @ w[2].T, x @ w[4].T, x @ w[5].T, x @ w[3].T, g @ w[6].T]
    return {
        "matmuls": (timed(matmuls),) * 2,
        "attention": (
            timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")),
            timed(lambda: cpu_ops.scaled_dot_product_attention(q, k, v, scale, "causal", ext.kernels())),
        ),
        "swiglu": (timed(lambda: nn.silu(g) * u), timed(lambda: cpu_ops.silu_mul(g, u, ext.kernels()))),
    }


# Prefill variants compared run by run: MLX's own ops, the fast path on MLX ops, the fast path
# on mlxgen's C++ kernels (mlxgen/backends/cpu/ext.py). Each re-prepares the model (the backend
# reads these variables at load).
VARIANTS = {"reference": {"MLXGEN_CPU_FAST_OPS": "off", "MLXGEN_CPU_KERNELS": "off"},
            "mlx-ops": {"MLXGEN_CPU_FAST_OPS": "on", "MLXGEN_CPU_KERNELS": "off"},
            "kernels": {"MLXGEN_CPU_FAST_OPS": "on", "MLXGEN_CPU_KERNELS": "on"}}


def prefill_ab(model, n: int, chunk: int, reps: int) -> dict[str, float]:
    """Median seconds of a whole prefill per variant, interleaved, fresh prompts."""
    def run(variant: str) -> float:
        os.environ.update(VARIANTS[variant])
        backends.prepare(model)
        ids = [random.randrange(100, model.args.vocab_size - 100) for _ in range(n)]
        t = time.perf_counter()
        mx.eval(prefill(model, ids, model.make_cache(), chunk))
        return time.perf_counter() - t

    for v in VARIANTS:  # warm-up: compiled kernels, allocator
        run(v)
    samples = {v: [] for v in VARIANTS}
    for i in range(reps):
        for v in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
            samples[v].append(run(v))
    for name in VARIANTS["reference"]:
        os.environ.pop(name)
    backends.prepare(model)
    return {v: statistics.median(t) for v, t in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--chunk-sizes", default="512")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-components", action="store_true")
    a = p.parse_args()
    lengths = [int(s) for s in a.lengths.split(",")]
    chunks = [int(s) for s in a.chunk_sizes.split(",")]
    model, _ = mlxgen.load(a.model)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
          f"backend {backends.device.backend_name()}; BLAS {blas_in_use()}; "
          f"matmul {matmul_gflops():.0f} GFLOP/s; model {a.model}")
    if not a.skip_components:
        print("\nper-layer ms for one chunk (reference -> fast):")
        for n in lengths:
            chunk = min(chunks[0], n)
            for name, (ref, fast) in layer_components(model.args, chunk, n).items():
                print(f"  chunk {chunk} at context {n:5d}  {name:10s} {ref:8.1f} -> {fast:8.1f}")
    print(f"\nwhole prefill, median s ({' / '.join(VARIANTS)}; kernels vs mlx-ops):")
    for n in lengths:
        for chunk in chunks:
            r = prefill_ab(model, n, chunk, a.reps)
            times = " / ".join(f"{r[v]:6.2f}" for v in VARIANTS)
            print(f"  {n:5d} tokens, chunk {chunk:5d}: {times}  x{r['kernels'] / r['mlx-ops']:.2f}", flush=True)


if __name__ == "__main__":
    main()
