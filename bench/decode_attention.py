"""One decode step's attention on the CPU: mlxgen's C++ kernel (kernels/cpu/fast_math.cpp,
`decode_attention`) against MLX's `mx.fast.scaled_dot_product_attention`, per model's heads and
cache length, on views of a larger cache buffer as the KV cache returns them.

    python bench/decode_attention.py [--rounds 15]

Medians of interleaved rounds (each candidate once per round), milliseconds per layer call."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402

from mlxgen.backends.cpu import ext as cpu_ext  # noqa: E402
from mlxgen.backends.cpu.ops import _THREADS  # noqa: E402

HEADS = {"SmolLM2-135M": (9, 3, 64), "Qwen2.5-0.5B": (14, 2, 64)}  # query heads, KV heads, head dim


def _time(fn, reps: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    ext = cpu_ext.kernels()
    print(f"threads {_THREADS}; medians of {a.rounds} interleaved rounds, ms per call")
    print("| heads (H/KV/D) | keys | MLX sdpa | mlxgen kernel | ratio |")
    print("|---|---|---|---|---|")
    for name, (H, KV, D) in HEADS.items():
        for n in (100, 2000, 4000):
            q = mx.random.normal((1, H, 1, D))
            k = mx.random.normal((1, KV, n + 256, D))[:, :, :n]
            v = mx.random.normal((1, KV, n + 256, D))[:, :, :n]
            mx.eval(q, k, v)
            ours = lambda: ext.decode_attention(q, k, v, D**-0.5, _THREADS)  # noqa: E731
            mlx = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # noqa: E731
            times = {"mlx": [], "ours": []}
            for _ in range(a.rounds):
                times["mlx"].append(_time(mlx))
                times["ours"].append(_time(ours))
            m, o = statistics.median(times["mlx"]), statistics.median(times["ours"])
            print(f"| {name} ({H}/{KV}/{D}) | {n} | {m:.3f} | {o:.3f} | {o / m:.2f}x |")


if __name__ == "__main__":
    main()
