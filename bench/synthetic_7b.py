"""Mac-profile memory of a 7B Q4_K_M GGUF, from a synthetic file with two Llama-2-7B-shaped layers.

llama.cpp's Q4_K_M keeps attn_v/ffn_down at Q6_K in half of a 32-layer model's layers ("more
bits" layers) and Q4_K elsewhere; token_embd is Q4_K, output Q6_K. The file holds one layer of
each kind plus the 32000 x 4096 embedding and output, filled with random blocks. A fresh process
reads it as the loader does (quantized kept) and reports MLX bytes per tensor kind and MLX's peak;
the 7B figures extrapolate: embedding + output + 16 x each layer kind.

    python bench/synthetic_7b.py [--out bench/results/synthetic-7b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT, GGUFWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from gguf_fixtures import random_blocks, tiny_vocab  # noqa: E402

HIDDEN, FF, HEADS, VOCAB, LAYERS = 4096, 11008, 32, 32000, 32

CHILD = r"""
import json, sys
import mlx.core as mx
from mlxgen.loading.gguf import read_gguf
c = read_gguf(sys.argv[1])
sizes = {}
for name, a in c.weights.items():
    kind = "embed/output" if not name.startswith("model.layers.") else f"layer{name.split('.')[2]}"
    sizes[kind] = sizes.get(kind, 0) + a.nbytes
print(json.dumps({"mlx_bytes": sizes, "mlx_peak": mx.get_peak_memory()}))
"""


def write(path: Path) -> dict[str, int]:
    rng = np.random.default_rng(0)
    tokens, token_types, merges = tiny_vocab()
    w = GGUFWriter(path, "llama")
    for key, value in {"block_count": 2, "context_length": 4096, "embedding_length": HIDDEN,
                       "feed_forward_length": FF, "attention.head_count": HEADS,
                       "attention.head_count_kv": HEADS}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "llama-bpe")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_array("tokenizer.ggml.merges", merges)
    gguf_bytes: dict[str, int] = {}

    def add(name: str, kind: str, shape: tuple[int, int] | tuple[int], qtype: QT) -> None:
        data = (np.ones(shape, np.float32) if qtype == QT.F32 else random_blocks(shape, qtype, rng))
        w.add_tensor(name, data, raw_dtype=None if qtype == QT.F32 else qtype)
        gguf_bytes[kind] = gguf_bytes.get(kind, 0) + data.nbytes

    add("token_embd.weight", "embed/output", (VOCAB, HIDDEN), QT.Q4_K)
    add("output.weight", "embed/output", (VOCAB, HIDDEN), QT.Q6_K)
    add("output_norm.weight", "embed/output", (HIDDEN,), QT.F32)
    for i, more_bits in enumerate((True, False)):  # layer0: a "more bits" layer, layer1: not
        v_down = QT.Q6_K if more_bits else QT.Q4_K
        for name, shape, qtype in (("attn_q", (HIDDEN, HIDDEN), QT.Q4_K),
                                   ("attn_k", (HIDDEN, HIDDEN), QT.Q4_K),
                                   ("attn_v", (HIDDEN, HIDDEN), v_down),
                                   ("attn_output", (HIDDEN, HIDDEN), QT.Q4_K),
                                   ("ffn_gate", (FF, HIDDEN), QT.Q4_K),
                                   ("ffn_up", (FF, HIDDEN), QT.Q4_K),
                                   ("ffn_down", (HIDDEN, FF), v_down),
                                   ("attn_norm", (HIDDEN,), QT.F32),
                                   ("ffn_norm", (HIDDEN,), QT.F32)):
            add(f"blk.{i}.{name}.weight", f"layer{i}", shape, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic-7b-2layers.gguf"
        gguf_bytes = write(path)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, cwd=ROOT,
                             capture_output=True, text=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    mlx = r["mlx_bytes"]
    half = LAYERS // 2
    total_gguf = gguf_bytes["embed/output"] + half * (gguf_bytes["layer0"] + gguf_bytes["layer1"])
    total_mlx = mlx["embed/output"] + half * (mlx["layer0"] + mlx["layer1"])
    transient = r["mlx_peak"] - sum(mlx.values())  # the largest in-flight temporaries
    result = {"gguf_bytes": gguf_bytes, "mlx_bytes": mlx, "mlx_peak_2_layers": r["mlx_peak"],
              "7b_gguf_gb": total_gguf / 1e9, "7b_mlx_gb": total_mlx / 1e9,
              "7b_weight_ratio": total_mlx / total_gguf,
              "7b_peak_ratio": (total_mlx + transient) / total_gguf}
    lines = ["| part | GGUF MB | MLX MB | ratio |", "|---|---|---|---|"]
    for kind in gguf_bytes:
        lines.append(f"| {kind} | {gguf_bytes[kind] / 2**20:.0f} | {mlx[kind] / 2**20:.0f} | "
                     f"{mlx[kind] / gguf_bytes[kind]:.3f} |")
    lines.append(f"| 7B extrapolated ({LAYERS} layers) | {total_gguf / 2**20:.0f} | "
                 f"{total_mlx / 2**20:.0f} | {result['7b_weight_ratio']:.3f} |")
    lines.append(f"| MLX peak while loading (7B, extrapolated) | | "
                 f"{(total_mlx + transient) / 2**20:.0f} | {result['7b_peak_ratio']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
