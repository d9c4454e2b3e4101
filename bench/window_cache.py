"""K/V memory of the windowed cache vs a full one after an 8k-token prefill, for real models'
cache shapes (layer count, KV heads, head size, windows); K/V written through the cache API,
in the chunks prefill uses. Also times a decode step's cache work (drop + append + fetch) at
8k in each, interleaved: `python bench/window_cache.py [--tokens 8192] [--chunk 512]`."""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mlxgen.cache import make_cache

# name: (layers, kv heads, head dim, window per layer (None: global))
SHAPES = {
    "mistral-7b-v0.1": (32, 8, 128, [4096] * 32),
    "gemma3-1b": (26, 1, 256, [None if (i + 1) % 6 == 0 else 512 for i in range(26)]),
    "gemma3-4b": (34, 4, 256, [None if (i + 1) % 6 == 0 else 1024 for i in range(34)]),
    "gemma2-2b": (26, 4, 256, [4096 if i % 2 == 0 else None for i in range(26)]),
}


def fill(cache, kv_heads: int, head_dim: int, tokens: int, chunk: int) -> None:
    kv = mx.zeros((1, kv_heads, chunk, head_dim), mx.float16)
    for _ in range(tokens // chunk):
        for c in cache:
            c.drop_unseen()
            c.update_and_fetch(kv, kv)
        mx.eval([a for c in cache for a in (c.keys, c.values)])


def buffer_bytes(cache) -> int:
    return sum(c.keys.nbytes + c.values.nbytes for c in cache)


def step_time(cache, kv_heads: int, head_dim: int) -> float:
    kv = mx.zeros((1, kv_heads, 1, head_dim), mx.float16)
    t = time.perf_counter()
    out = []
    for c in cache:
        c.drop_unseen()
        out += c.update_and_fetch(kv, kv)
    mx.eval(out)
    for c in cache:
        c.trim(1)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    print("| model shape | full cache (MiB) | windowed (MiB) | ratio | decode-step cache work full / windowed |")
    print("|---|---|---|---|---|")
    for name, (layers, heads, dim, windows) in SHAPES.items():
        full = make_cache(layers, "standard", windows=windows, keep_all=True)
        win = make_cache(layers, "standard", windows=windows)
        fill(full, heads, dim, a.tokens, a.chunk)
        fill(win, heads, dim, a.tokens, a.chunk)
        f, w = buffer_bytes(full), buffer_bytes(win)
        times = {"full": [], "win": []}
        for _ in range(a.rounds):  # interleaved
            times["full"].append(step_time(full, heads, dim))
            times["win"].append(step_time(win, heads, dim))
        tf, tw = (statistics.median(times[k]) for k in ("full", "win"))
        print(f"| {name} | {f / 2**20:.0f} | {w / 2**20:.0f} | {w / f:.2f} | {tf * 1e3:.2f} / {tw * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
