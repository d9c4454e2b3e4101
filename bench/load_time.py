"""Fresh-process load time and peak RSS of a GGUF, quantized="keep" vs "dequantize" (issue 14).

Each measurement is one new Python process that imports mlxgen, then times `mlxgen.load(path,
quantized=...)` and the phases inside it (header, tokenizer, tensors, model build). Modes are
interleaved (keep, dequantize, keep, ...) and medians reported, so neighbours' noise hits both.

    python bench/load_time.py --models smollm2,qwen2.5-coder --reps 3 --out bench/results/load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: times the phases, then reports peak RSS (ru_maxrss, KiB on Linux).
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import mlx.core as mx
import mlxgen
from mlxgen.loading import gguf, gguf_tokenizer
t_import = time.perf_counter() - t0
path, mode = sys.argv[1], sys.argv[2]
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
phases = {"mlxgen": mlxgen.__file__}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return out
    return wrapper
import mlxgen.loading as loading
gguf.read_gguf_header = timed("header", gguf.read_gguf_header)
gguf.tokenizer_from_gguf = timed("tokenizer", gguf.tokenizer_from_gguf)
gguf.read_gguf = timed("read", gguf.read_gguf)
loading.build_model = timed("build", loading.build_model)
t = time.perf_counter()
model, tok = mlxgen.load(path, quantized=mode)
t_load = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_bytes = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
print(json.dumps({"import_s": t_import, "load_s": t_load, "peak_rss_mb": rss, "import_rss_mb": import_rss,
                  "weight_mb": n_bytes / 2**20, **{k if k == "mlxgen" else f"{k}_s": v for k, v in phases.items()}}))
"""


def run_once(path: str, mode: str, root: str = str(ROOT)) -> dict:
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", CHILD, path, mode], env=env, check=True, cwd=root,
                         capture_output=True, text=True, timeout=900)  # cwd: -c puts it first on sys.path
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen2.5-coder", help="PyPI model names or .gguf paths")
    ap.add_argument("--modes", default="keep,dequantize")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trees", default=f"this={ROOT}",
                    help="LABEL=DIR,... mlxgen source trees to compare (e.g. an older checkout)")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxgen.loading import pypi

    results = {}
    for model in args.models.split(","):
        path = str(pypi.fetch(model)) if pypi.resolve_name(model) else model
        trees = dict(t.split("=", 1) for t in args.trees.split(","))
        runs: dict[str, list[dict]] = {f"{label}:{m}": [] for label in trees for m in args.modes.split(",")}
        for rep in range(args.reps):
            for key in runs:  # interleaved
                label, mode = key.split(":")
                runs[key].append(run_once(path, mode, trees[label]))
                print(model, key, rep, runs[key][-1], flush=True)
        results[model] = {
            "file_mb": os.path.getsize(path) / 2**20,
            **{mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "mlxgen"}
               for mode, rs in runs.items()},
        }
    lines = ["| model | code:mode | import s | load s | read_gguf s | header s | tokenizer s | build s "
             "| RSS after import MB | peak RSS MB | weights MB | file MB |", "|---" * 12 + "|"]
    for model, r in results.items():
        for key, m in r.items():
            if key == "file_mb":
                continue
            lines.append(f"| {model} | {key} | {m['import_s']:.2f} | {m['load_s']:.2f} | {m.get('read_s', 0):.2f} | "
                         f"{m.get('header_s', 0):.2f} | {m.get('tokenizer_s', 0):.2f} | "
                         f"{m.get('build_s', 0):.2f} | {m['import_rss_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['weight_mb']:.0f} | "
                         f"{r['file_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1))
        Path(args.out + ".md").write_text(f"medians of {args.reps} interleaved fresh-process runs\n\n{table}\n")


if __name__ == "__main__":
    main()
