"""Phi-3's fused projections kept fused vs split at load (what mlxgen does): one matmul against
the fused weight vs two/three against its row blocks, float32, Phi-3-mini's shapes, decode (1 row)
and a prefill chunk. Medians of interleaved rounds: `python bench/fused_proj.py`."""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

HIDDEN = 3072
FUSED = {"qkv": [3072, 3072, 3072], "gate_up": [8192, 8192]}


def timed(fn, x) -> float:
    t = time.perf_counter()
    mx.eval(fn(x))
    return time.perf_counter() - t


def main(rounds: int = 15) -> None:
    print("| projection | rows | fused (ms) | split (ms) | split / fused |")
    print("|---|---|---|---|---|")
    for name, parts in FUSED.items():
        w = mx.random.normal((sum(parts), HIDDEN)) * 0.02
        bounds = [sum(parts[:i]) for i in range(len(parts) + 1)]
        split = [mx.array(w[a:b]) for a, b in zip(bounds, bounds[1:])]
        mx.eval(w, *split)

        def fused(x):
            y = x @ w.T
            return [y[..., a:b] for a, b in zip(bounds, bounds[1:])]

        def separate(x):
            return [x @ s.T for s in split]

        for rows in (1, 128):
            x = mx.random.normal((1, rows, HIDDEN))
            mx.eval(x)
            times = {"fused": [], "split": []}
            for _ in range(rounds):
                times["fused"].append(timed(fused, x))
                times["split"].append(timed(separate, x))
            f, s = (statistics.median(times[k]) * 1e3 for k in ("fused", "split"))
            print(f"| {name} | {rows} | {f:.2f} | {s:.2f} | {s / f:.2f} |")


if __name__ == "__main__":
    main()
