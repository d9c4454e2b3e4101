"""mlxgen's CPU kernels on quantized weights (kernels/cpu/quant.cpp) against MLX, side by side.

    python bench/quant_kernels.py [--rounds 15] [--out bench/results/quant-kernels.md]

Table 1, decode (one row of x): qmatvec (float32 and float16 scales) vs mx.quantized_matmul vs
mlxgen's float32 matvec vs MLX's float32 `x @ w.T`, per projection shape of Qwen2.5-0.5B and
SmolLM2-135M, 4 and 8 bits, groups of 32. Table 2, prefill (512 rows): dequantize (ours and
mx.dequantize) + BLAS matmul vs the matmul on float32 weights. Set OPENBLAS_CORETYPE to what
the machine's OpenBLAS should use: the line printed first names the kernels it picked. Medians of interleaved runs
(every candidate once per round), so load from other processes hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402

from mlxgen.backends.cpu import ext as cpu_ext  # noqa: E402
from mlxgen.backends.cpu import quant as cpu_quant  # noqa: E402

# (outputs N, inputs K) as nn.Linear stores the weight: q/o, k/v, gate/up, down, LM head.
DECODE_SHAPES = {
    "Qwen2.5-0.5B": [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)],
    "SmolLM2-135M": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
}
PREFILL_SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864)]
PREFILL_ROWS = 512
GROUP = 32


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "?"
    with open("/proc/cpuinfo") as f:
        flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    avx = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    import _mlxgen_blas

    core = _mlxgen_blas.status.get("core")
    return (f"{model}, {os.cpu_count()} cores, {avx}; OPENBLAS_CORETYPE="
            f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')} (OpenBLAS kernels: {core}); MLX {mx.__version__}")


def interleaved(candidates: dict, rounds: int) -> dict:
    """Median milliseconds per candidate, each run once per round in turn (after one warm-up)."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        mx.eval(fn())
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def decode_table(rounds: int) -> list[str]:
    ext = cpu_ext.kernels()
    threads = min(8, os.cpu_count() or 1)
    head = ["model", "N x K", "bits", "qmatvec f32 scales", "qmatvec f16 scales", "mx.quantized_matmul",
            "f32 matvec (ours)", "MLX f32 x @ w.T", "f32 matvec / qmatvec", "quantized_matmul / qmatvec"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, shapes in DECODE_SHAPES.items():
        for n, k in shapes:
            w = mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.05
            x = mx.random.normal((1, k), key=mx.random.key(1))
            mx.eval(w, x)
            for bits in (4, 8):
                q, s, b = mx.quantize(w, group_size=GROUP, bits=bits)
                s16, b16 = s.astype(mx.float16), b.astype(mx.float16)
                mx.eval(q, s, b, s16, b16)
                r = rounds if n * k < 20_000_000 else max(5, rounds // 3)
                ms = interleaved({
                    "q32": lambda: ext.qmatvec(x, q, s, b, bits, GROUP, threads),
                    "q16": lambda: ext.qmatvec(x, q, s16, b16, bits, GROUP, threads),
                    "mlxq": lambda: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=GROUP, bits=bits),
                    "f32": lambda: ext.matvec(x, w, threads),
                    "mlx32": lambda: x @ w.T,
                }, r)
                rows.append(f"| {model} | {n}x{k} | {bits} | {ms['q32']:.3f} | {ms['q16']:.3f} | {ms['mlxq']:.3f} "
                            f"| {ms['f32']:.3f} | {ms['mlx32']:.3f} | {ms['f32'] / ms['q32']:.2f} "
                            f"| {ms['mlxq'] / ms['q32']:.2f} |")
                print(rows[-1], flush=True)
            del w
    return rows


def prefill_table(rounds: int) -> list[str]:
    # mx.quantized_matmul is left out here: seconds per call at 512 rows on the CPU (bench/NOTES.md).
    head = ["N x K", "bits", "dequantize (ours)", "ours + matmul", "mx.dequantize + matmul",
            "f32 matmul", "(ours + matmul) / f32 matmul"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    x = mx.random.normal((PREFILL_ROWS, 896), key=mx.random.key(2))
    for n, k in PREFILL_SHAPES:
        w = mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.05
        xk = x if k == 896 else mx.random.normal((PREFILL_ROWS, k), key=mx.random.key(3))
        mx.eval(w, xk)
        for bits in (4, 8):
            q, s, b = mx.quantize(w, group_size=GROUP, bits=bits)
            mx.eval(q, s, b)
            ms = interleaved({
                "deq": lambda: cpu_quant.dequantize(q, s, b, bits, GROUP),
                "deqmm": lambda: xk @ cpu_quant.dequantize(q, s, b, bits, GROUP).T,
                "mlxdeqmm": lambda: xk @ mx.dequantize(q, s, b, group_size=GROUP, bits=bits).T,
                "mm": lambda: xk @ w.T,
            }, rounds)
            rows.append(f"| {n}x{k} | {bits} | {ms['deq']:.2f} | {ms['deqmm']:.2f} | {ms['mlxdeqmm']:.2f} "
                        f"| {ms['mm']:.2f} | {ms['deqmm'] / ms['mm']:.3f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", help="also write the tables (markdown) here")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    if cpu_ext.kernels() is None:
        raise SystemExit("mlxgen's CPU kernels are not built; see the warning above")
    lines = [f"Machine: {machine()}", ""]
    print(lines[0], flush=True)
    if not args.skip_decode:
        lines += ["Decode, one row, milliseconds (median of interleaved runs):", ""] + decode_table(args.rounds) + [""]
    if not args.skip_prefill:
        lines += [f"Prefill chunk of {PREFILL_ROWS} rows, milliseconds:", ""] + prefill_table(args.rounds) + [""]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
