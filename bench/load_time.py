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
path, mode, dtype = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
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
model, tok = mlxgen.load(path, quantized=mode, dtype=dtype)
t_load = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_bytes = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
phases = {k if k == "mlxgen" else f"{k}_s": v for k, v in phases.items()}
print(json.dumps({"import_s": t_import, "load_s": t_load, "peak_rss_mb": rss,
                  "import_rss_mb": import_rss, "mlx_peak_mb": mx.get_peak_memory() / 2**20,
                  "weight_mb": n_bytes / 2**20, **phases}))
"""


def run_once(path: str, mode: str, root: str = str(ROOT), dtype: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": root}
    argv = [sys.executable, "-c", CHILD, path, mode] + ([dtype] if dtype else [])
    # cwd=root: `python -c` puts the working directory first on sys.path
    out = subprocess.run(argv, env=env, check=True, cwd=root, capture_output=True, text=True,
                         timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen2.5-coder",
                    help="PyPI model names or .gguf paths")
    ap.add_argument("--modes", default="keep,dequantize")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trees", default=f"this={ROOT}",
                    help="LABEL=DIR,... mlxgen source trees to compare (e.g. an older checkout)")
    ap.add_argument("--dtype", help='e.g. "float16" with --modes keep: the Mac profile on the CPU')
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxgen.loading import pypi

    results = {}
    for model in args.models.split(","):
        path = str(pypi.fetch(model)) if pypi.resolve_name(model) else model
        trees = dict(t.split("=", 1) for t in args.trees.split(","))
        modes = args.modes.split(",")
        runs: dict[str, list[dict]] = {f"{label}:{m}": [] for label in trees for m in modes}
        for rep in range(args.reps):
            for key in runs:  # interleaved
                label, mode = key.split(":")
                runs[key].append(run_once(path, mode, trees[label], args.dtype))
                print(model, key, rep, runs[key][-1], flush=True)
        results[model] = {
            "file_mb": os.path.getsize(path) / 2**20,
            **{mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "mlxgen"}
               for mode, rs in runs.items()},
        }
    lines = ["| model | code:mode | import s | load s | read_gguf s | header s | tokenizer s "
             "| build s | RSS after import MB | peak RSS MB | MLX peak MB | weights MB | file MB |",
             "|---" * 13 + "|"]
    for model, r in results.items():
        for key, m in r.items():
            if key == "file_mb":
                continue
            cells = [f"{m[k]:.2f}" for k in ("import_s", "load_s", "read_s", "header_s",
                                                "tokenizer_s", "build_s")]
            cells += [f"{m[k]:.0f}" for k in ("import_rss_mb", "peak_rss_mb", "mlx_peak_mb",
                                               "weight_mb")]
            lines.append(f"| {model} | {key} | {' | '.join(cells)} | {r['file_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1))
        head = f"medians of {args.reps} interleaved fresh-process runs"
        Path(args.out + ".md").write_text(f"{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
