"""`mlxgen bench kernels`: kernel vs MLX composition per shape, and what "auto" would pick."""

from __future__ import annotations

import argparse
from typing import Sequence

import mlx.core as mx

from .dispatch import KernelDispatch, _time_us, microbenchmark
from .launch import decode_kernel, rope_kernel
from .reference import RopeParams, decode_attention_composition, rope_composition

# (label, B, Hq, Hk, Lq, D): the attention shapes of common model sizes.
DEFAULT_SHAPES = (
    ("llama-3.2-1b", 1, 32, 8, 1, 64),
    ("llama-3-8b", 1, 32, 8, 1, 128),
    ("qwen2.5-0.5b", 1, 14, 2, 1, 64),
    ("llama-3-8b spec4", 1, 32, 8, 4, 128),
)
DEFAULT_KEYS = (512, 2048, 8192, 32768)


def bench_kernels(shapes=DEFAULT_SHAPES, keys: Sequence[int] = DEFAULT_KEYS,
                  dtype: mx.Dtype | None = None, dispatch: KernelDispatch | None = None) -> list[dict]:
    """One row per (op, shape, context): composition and kernel time in microseconds.

    Where kernels cannot run (the CPU) only the composition is timed and kernel_us is None."""
    d = dispatch or KernelDispatch("auto")
    dtype = dtype or (mx.float16 if d.enabled else mx.float32)
    rows = []
    for label, B, Hq, Hk, Lq, D in shapes:
        rp = RopeParams(D, base=500000.0)
        for n in keys:
            q = mx.random.normal((B, Hq, Lq, D)).astype(dtype)
            k, v = (mx.random.normal((B, Hk, n, D)).astype(dtype) for _ in range(2))
            comp = lambda: decode_attention_composition(q, k, v, n, rp, D**-0.5)  # noqa: E731
            kern = lambda: decode_kernel(q, k, v, n, rp, D**-0.5, d.factory)  # noqa: E731
            rows.append(_row("decode_prerope", f"{label} n={n}", dtype, d, kern, comp))
        kq = mx.random.normal((B, Hq, 1, D)).astype(dtype)
        kk = mx.random.normal((B, Hk, 1, D)).astype(dtype)
        rows.append(_row("rope", f"{label} L=1", dtype, d,
                         lambda: rope_kernel(kq, kk, rp, 100, d.factory),
                         lambda: rope_composition(kq, kk, rp, 100)))
    return rows


def _row(op, shape, dtype, d: KernelDispatch, kernel, composition) -> dict:
    row = {"op": op, "shape": shape, "dtype": str(dtype).split(".")[-1]}
    if d.enabled:
        row.update(microbenchmark(kernel, composition))
    else:
        mx.eval(composition())
        row.update(use_kernel=False, kernel_us=None, note="kernels unavailable here",
                   composition_us=round(_time_us(composition, 3, 2), 1))
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<15} {'shape':<26} {'dtype':<9} {'composition':>12} {'kernel':>10} {'speedup':>8}  auto picks"
    lines = [head, "-" * len(head)]
    for r in rows:
        k, c = r["kernel_us"], r["composition_us"]
        speed = f"{c / k:.2f}x" if k and c else "-"
        pick = "kernel" if r["use_kernel"] else "composition"
        lines.append(f"{r['op']:<15} {r['shape']:<26} {r['dtype']:<9} "
                     f"{f'{c:.1f} us' if c else '-':>12} {f'{k:.1f} us' if k else 'n/a':>10} "
                     f"{speed:>8}  {pick}{' (' + r['note'] + ')' if r['note'] else ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlxgen bench kernels", description=__doc__)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--keys", type=int, nargs="+", default=list(DEFAULT_KEYS),
                   help="context lengths to time (default: %(default)s)")
    args = p.parse_args(argv)
    d = KernelDispatch("auto")
    if not d.enabled:
        print(f"note: {d.reason}; only the MLX composition is timed, and it is what runs here.")
    rows = bench_kernels(keys=args.keys, dtype=getattr(mx, args.dtype) if args.dtype else None,
                         dispatch=d)
    print(format_table(rows))
    return 0
