"""GGUF block repack throughput per type (issue 14, first load): numpy (mlxgen/loading) vs the
CPU kernels' repack_blocks (kernels/cpu/repack.cpp), on one thread and on all of them.

Random blocks of each type (finite fp16 scales) are repacked into preallocated outputs (what
the loader's MLX buffers are), so allocation and first touch are not in the timing. The four
variants run interleaved, round after round, and each one's median is reported as MB/s of GGUF
input, with the kernel/numpy ratio at the same thread count.

    python bench/repack_throughput.py [--mb 32] [--reps 7] [--types Q4_0,Q6_K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
    from gguf_fixtures import random_blocks

    from mlxgen.backends.cpu import ext
    from mlxgen.loading import gguf as loader, gguf_quants

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32, help="GGUF bytes per type")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K")
    args = ap.parse_args()
    kernels = ext.kernels()
    if kernels is None:
        sys.exit("the CPU kernels are not available")
    cores = os.cpu_count() or 1
    print(f"cores {cores}; {args.mb:g} MB of blocks per type; median of {args.reps} interleaved rounds")
    print("| type | numpy 1 thread | numpy pool | C++ 1 thread | C++ all cores | C++/numpy 1 | C++/numpy all |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in args.types.split(","):
        qtype = QT[name]
        block, size = GGML_QUANT_SIZES[qtype]
        cols = 4096
        rows = max(1, int(args.mb * 1e6 / (cols // block * size)))
        if qtype in gguf_quants.K_BITS:
            raw = random_blocks((rows, cols), qtype, rng)
        else:
            raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            blocks = raw.reshape(rows, -1, size)
            blocks[..., 0:2] = rng.uniform(1e-3, 1e-2, blocks.shape[:2] + (1,)).astype(
                np.float16).view(np.uint8)
        bits = loader.NATIVE_BITS.get(qtype) or gguf_quants.K_BITS[qtype]
        outs = [np.empty((rows, cols * bits // 32), np.uint32),
                np.empty((rows, cols // 32), np.float16), np.empty((rows, cols // 32), np.float16)]
        take = iter(())

        def alloc(shape, dtype):
            return next(take)

        def numpy_run(workers: int):
            nonlocal take
            gguf_quants._MAX_WORKERS = workers
            take = iter(outs)
            if qtype in loader.NATIVE_BITS:
                gguf_quants.in_row_chunks(raw, qtype, lambda r: loader._repack_native(r, qtype), alloc)
            else:
                gguf_quants.repack_k(raw, qtype, alloc)

        def kernel_run(threads: int):
            kernels.repack_blocks(raw, int(qtype), *outs, threads=threads)

        variants = {"numpy 1": lambda: numpy_run(1), "numpy all": lambda: numpy_run(8),
                    "C++ 1": lambda: kernel_run(1), "C++ all": lambda: kernel_run(cores)}
        times = {k: [] for k in variants}
        for v in variants.values():  # warm: pages touched, pools started
            v()
        for _ in range(args.reps):
            for k, v in variants.items():
                t = time.perf_counter()
                v()
                times[k].append(time.perf_counter() - t)
        mbs = {k: raw.nbytes / 1e6 / statistics.median(t) for k, t in times.items()}
        print(f"| {name} | {mbs['numpy 1']:.0f} | {mbs['numpy all']:.0f} | {mbs['C++ 1']:.0f} | "
              f"{mbs['C++ all']:.0f} | {mbs['C++ 1'] / mbs['numpy 1']:.1f}x | "
              f"{mbs['C++ all'] / mbs['numpy all']:.1f}x |", flush=True)
    gguf_quants._MAX_WORKERS = 8


if __name__ == "__main__":
    main()
