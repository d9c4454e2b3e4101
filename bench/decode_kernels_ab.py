"""Decode tok/s with the CPU kernels of an earlier git revision and the current ones, in ONE
process on one loaded model, interleaved generation by generation: on a shared machine this
holds other load equal far better than fresh processes (bench/decode_ab.py).

    python bench/decode_kernels_ab.py --model qwen2.5-coder:0.5b --baseline 0b47347 [--rounds 7]

The swap replaces what the CPU layers call through `ext.loaded()`: the projections and head
(qmatvec / dequantize / matvec), RMSNorm and RoPE. The decode attention and SwiGLU stay bound to
the current module (plugged in at load). Each generation: a fresh ~100-token prompt of random
tokens, then 32 greedy tokens (EOS ignored); mlxgen's own decode tok/s, medians."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlxgen  # noqa: E402
from mlxgen.backends.cpu import ext  # noqa: E402
from qmatvec_kernels import baseline_module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=100)
    args = ap.parse_args()
    model, tok = mlxgen.load(args.model)
    mods = {f"baseline {args.baseline}": baseline_module(args.baseline), "now": ext.loaded()}
    rng = random.Random(0)
    tps = {name: [] for name in mods}
    original = ext.loaded
    try:
        for r in range(args.rounds + 1):  # round 0 warms both up
            for name in (list(mods) if r % 2 == 0 else list(mods)[::-1]):
                ext.loaded = lambda m=mods[name]: m
                ids = [rng.randrange(1000, min(30000, model.args.vocab_size - 1)) for _ in range(args.prompt)]
                resp = None
                for resp in mlxgen.stream_generate(model, tok, ids, max_tokens=32):
                    pass
                if r:
                    tps[name].append(resp.stats.decode_tps)
                    print(name, f"{resp.stats.decode_tps:.2f}", flush=True)
    finally:
        ext.loaded = original
    base, now = (statistics.median(tps[n]) for n in mods)
    print(f"model {args.model}; ~{args.prompt}-token prompt, 32 tokens; medians of {args.rounds} interleaved "
          f"generations in one process; load average {os.getloadavg()[0]:.1f}")
    print(f"| kernels | decode tok/s |\n|---|---|\n| {list(mods)[0]} | {base:.2f} |\n| now | {now:.2f} |\n"
          f"| now / baseline | {now / base:.2f}x |")


if __name__ == "__main__":
    main()
