"""The decode-side quantized kernels (kernels/cpu/quant.cpp's qmatvec) against the machine's
memory-read ceiling, and against an earlier build of the same kernels, side by side.

    python bench/qmatvec_kernels.py [--baseline REV] [--rounds 15] [--threads 2] [--out FILE.md]

1. The ceiling: the extension's `read_bandwidth` (a plain vector read loop on the worker pool) on
   1 and 2 threads, over 1 GiB (DRAM) and 8 MiB (cache-resident).
2. Per projection shape of Qwen2.5-0.5B and SmolLM2-135M and per bit width (float16 scales and
   biases, groups of 32: what the CPU backend keeps after loading a GGUF), qmatvec on one row of
   x. The weights are cycled through copies totalling --stream-mib, so every call reads them from
   memory as a decode step does (one step reads the whole model once), not from cache.
   With --baseline REV, kernels/cpu/ at that git revision is built too (cached) and both run
   interleaved: every candidate once per round, medians, so other load hits both alike.
GB/s counts the bytes qmatvec must read: packed codes plus scales and biases.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxgen import settings  # noqa: E402
from mlxgen.backends.cpu import ext as cpu_ext  # noqa: E402

SHAPES = {  # (outputs N, inputs K) per projection, as nn.Linear stores the weight
    "Qwen2.5-0.5B": [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)],
    "SmolLM2-135M": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
}
BITS = (4, 5, 6, 8)
GROUP = 32
REPO = Path(__file__).resolve().parents[1]


def baseline_module(rev: str):
    """The extension built from kernels/cpu/ at git revision `rev` (cached per revision)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    out = settings.cache_dir() / "bench-baseline" / hashlib.sha256((sha + cpu_ext._versions()).encode()).hexdigest()[:16]
    lib = next(out.glob(f"{cpu_ext.MODULE}*.so"), None) if out.is_dir() else None
    if lib is None:
        src = Path(tempfile.mkdtemp(prefix="baseline-src-"))
        names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", sha, "kernels/cpu/"],
                               capture_output=True, text=True, check=True).stdout.split()
        for name in names:
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{sha}:{name}"], capture_output=True,
                                  text=True, check=True).stdout
            (src / Path(name).name).write_text(text)
        for step in (["cmake", "-S", str(src), "-B", str(out), f"-DPython_EXECUTABLE={sys.executable}"],
                     ["cmake", "--build", str(out), "--parallel", "2"]):
            subprocess.run(step, check=True, capture_output=True, timeout=900)
        lib = next(out.glob(f"{cpu_ext.MODULE}*.so"))
    spec = importlib.util.spec_from_file_location(cpu_ext.MODULE, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ceiling(ext) -> dict:
    return {(t, size): ext.read_bandwidth(words, t, 9) / 1e9
            for t in (1, 2) for size, words in (("1 GiB", 1 << 27), ("8 MiB", 1 << 20))}


def copies(n: int, k: int, bits: int, stream_mib: int) -> tuple[list, int]:
    w = mx.random.normal((n, k), key=mx.random.key(n * 7 + k)) * 0.05
    q, s, b = mx.quantize(w.astype(mx.float16), group_size=GROUP, bits=bits)
    nbytes = q.nbytes + s.nbytes + b.nbytes
    count = max(1, -(-stream_mib * 2**20 // nbytes))
    qn, sn, bn = np.array(q), np.array(s), np.array(b)
    out = [(mx.array(qn.copy()), mx.array(sn.copy()), mx.array(bn.copy())) for _ in range(count)]
    mx.eval(out)
    return out, nbytes


def timed(fn, weights: list, x: mx.array, bits: int, threads: int, state: dict, clock) -> float:
    # Next copy in the cycle: memory-resident, as in a decode step.
    i = state["i"] = (state["i"] + 1) % len(weights)
    q, s, b = weights[i]
    start = clock()
    mx.eval(fn(x, q, s, b, bits, GROUP, threads))
    return clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="git revision whose kernels/cpu/ to compare with")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--stream-mib", type=int, default=512)
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time per call (on one thread, the kernel's own time, "
                         "which other processes on a shared machine inflate far less than wall time)")
    ap.add_argument("--out")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ext = cpu_ext.kernels()
    cands = {"now": ext.qmatvec}
    if args.baseline:
        cands = {f"baseline {args.baseline}": baseline_module(args.baseline).qmatvec, **cands}
    lines = [f"machine: {os.cpu_count()} cores, MLX {mx.__version__}; qmatvec on {args.threads} threads ({args.clock} "
             f"clock), one row "
             f"of x, float16 scales, groups of {GROUP}, weights cycled over {args.stream_mib} MiB of copies; "
             f"medians of {args.rounds} interleaved rounds; load average at start "
             f"{os.getloadavg()[0]:.1f}", ""]
    ceil = ceiling(ext)
    lines += ["| read ceiling | 1 thread | 2 threads |", "|---|---|---|"]
    for size in ("1 GiB", "8 MiB"):
        lines.append(f"| {size} | {ceil[(1, size)]:.1f} GB/s | {ceil[(2, size)]:.1f} GB/s |")
    top = max(ceil[(t, '1 GiB')] for t in (1, 2))
    head = ["model", "N x K", "bits", "MB read"] + [f"{c} ms" for c in cands] + [f"{c} GB/s" for c in cands]
    head += ["now GB/s / DRAM ceiling"] + (["speed-up"] if len(cands) > 1 else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    for model in args.models.split(","):
        for n, k in SHAPES[model]:
            for bits in map(int, args.bits.split(",")):
                weights, nbytes = copies(n, k, bits, args.stream_mib)
                x = mx.random.normal((1, k), key=mx.random.key(1))
                times = {c: [] for c in cands}
                state = {c: {"i": 0} for c in cands}
                for c, fn in cands.items():  # warm-up (and the first touch of each copy's pages)
                    for _ in range(min(len(weights), 3)):
                        timed(fn, weights, x, bits, args.threads, state[c], clock)
                for _ in range(args.rounds):
                    for c, fn in cands.items():
                        times[c].append(timed(fn, weights, x, bits, args.threads, state[c], clock))
                ms = {c: statistics.median(t) * 1e3 for c, t in times.items()}
                gbs = {c: nbytes / (m / 1e3) / 1e9 for c, m in ms.items()}
                row = [model, f"{n} x {k}", str(bits), f"{nbytes / 1e6:.2f}"]
                row += [f"{ms[c]:.3f}" for c in cands] + [f"{gbs[c]:.1f}" for c in cands]
                row.append(f"{gbs['now'] / top:.2f}")
                if len(cands) > 1:
                    first = next(iter(cands))
                    row.append(f"{ms[first] / ms['now']:.2f}x")
                line = "| " + " | ".join(row) + " |"
                lines.append(line)
                print(line, flush=True)
                del weights
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
