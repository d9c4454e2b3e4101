"""OpenBLAS sgemm GFLOP/s per kernel set (OPENBLAS_CORETYPE) on the projection shapes of a
Qwen2.5-0.5B prefill, each kernel set in its own process (OpenBLAS picks kernels when it loads).

    python bench/openblas_kernels.py [--cores Haswell,SkylakeX,Cooperlake] [--rounds 3]

Backs the kernel choice in _mlxgen_blas.py (bench/NOTES.md, session 5). Linux with Debian's
libopenblas0-pthread only; numpy for the buffers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# (rows, inner, outputs): q/o, k/v, gate/up, down at 128 rows; gate/up and down at 512 rows.
SHAPES = [(128, 896, 896), (128, 896, 128), (128, 896, 4864), (128, 4864, 896),
          (512, 896, 4864), (512, 4864, 896)]


def measure(reps: int = 15) -> list[float]:
    """GFLOP/s (median of reps) for each shape, with the OpenBLAS this process loads."""
    import ctypes
    import statistics
    import time

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import _mlxgen_blas

    path = _mlxgen_blas.find_blas()
    if path is None:
        raise SystemExit("no OpenBLAS found (apt install libopenblas0-pthread)")
    lib = ctypes.CDLL(path)
    ptr = ctypes.c_void_p
    lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ptr, ctypes.c_int, ptr,
                                                     ctypes.c_int, ctypes.c_float, ptr, ctypes.c_int]
    rng = np.random.default_rng(0)
    out = []
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)  # (out, in), as nn.Linear stores it
        c = np.empty((m, n), np.float32)
        # Row-major (101), A as is (111), W transposed (112): c = a @ w.T, as MLX calls it.
        call = lambda: lib.cblas_sgemm(101, 111, 112, m, n, k, 1.0, a.ctypes.data, k,
                                       w.ctypes.data, k, 0.0, c.ctypes.data, n)
        call()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out.append(2 * m * k * n / statistics.median(times) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", default="Haswell,SkylakeX,Cooperlake")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the kernel sets")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(" ".join(f"{g:.0f}" for g in measure()))
        return
    print("kernels    " + " ".join(f"{m}x{k}x{n}" for m, k, n in SHAPES))
    for _ in range(args.rounds):
        for core in args.cores.split(","):
            env = dict(os.environ, OPENBLAS_CORETYPE=core)
            proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                                  capture_output=True, text=True, check=True, timeout=300)
            print(f"{core:10s} {proc.stdout.strip()}")


if __name__ == "__main__":
    main()
