"""Fresh-process load time and peak RSS of a GGUF, quantized="keep" vs "dequantize" (issue 14),
and through the converted-weights cache (mlxgen/loading/converted.py).

Each measurement is one new Python process that imports mlxgen, then times `mlxgen.load(path,
quantized=...)` and the phases inside it (header, tokenizer, tensors, model build, cache read and
write). Modes are interleaved (keep, dequantize, keep, ...) and medians reported, so neighbours'
noise hits both. Modes: keep / dequantize (cache off), first (cache on, its entries for the file
removed before the run: convert and write), cached (cache on, the entry present: read it).

    python bench/load_time.py --models smollm2,qwen2.5-coder --reps 3 --out bench/results/load
    python bench/load_time.py --modes first,cached,keep --warm-mb 2000 ...

--warm-mb N touches N MB of fresh memory in a throwaway process before every run: this VM's host
reclaims idle guest memory, and the first touch of it costs far more than on a Mac.

With --ollama URL --ollama-models smollm2=NAME,... each round also times the reference Ollama's
cold load of the same file (bench/reference/ollama_ref.py; OLLAMA_NUM_GPU=0): the model is
unloaded (`keep_alive: 0`), then a one-token request reports `load_duration` (and the client's
wall time for that request); its answer to a fixed question is checked once first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: times the phases, then reports peak RSS (ru_maxrss, KiB on Linux).
# A fresh process's phase timer: `phases[name]` accumulates the seconds spent in the wrapped
# function (also used by bench/import_time.py's child).
PHASE_TIMER = r"""
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return out
    return wrapper
"""

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import mlx.core as mx
import mlxgen
t_import = time.perf_counter() - t0
from mlxgen.loading import gguf, gguf_tokenizer  # for the phase timers: not part of the import
path, mode, dtype = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
phases = {"mlxgen": mlxgen.__file__}
""" + PHASE_TIMER + r"""
import mlxgen.loading as loading
gguf.read_gguf_header = timed("header", gguf.read_gguf_header)
gguf.tokenizer_from_gguf = timed("tokenizer", gguf.tokenizer_from_gguf)
gguf.read_gguf = timed("read", gguf.read_gguf)
loading.build_model = timed("build", loading.build_model)
cache = mode in ("first", "cached")
try:
    from mlxgen.loading import converted
    converted.Entry.read = timed("cache_read", converted.Entry.read)
    converted.Entry.write = timed("cache_write", converted.Entry.write)
    kw = {"cache": cache}
except ImportError:  # an older tree (--trees): no cache
    kw, converted = {}, None
t = time.perf_counter()
model, tok = mlxgen.load(path, quantized="keep" if cache else mode, dtype=dtype, **kw)
t_load = time.perf_counter() - t
if hasattr(converted, "wait_for_writes"):  # a first load's entry is written on a thread
    converted.wait_for_writes()
t_written = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_bytes = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
phases = {k if k == "mlxgen" else f"{k}_s": v for k, v in phases.items()}
print(json.dumps({"import_s": t_import, "load_s": t_load, "written_s": t_written, "peak_rss_mb": rss,
                  "import_rss_mb": import_rss, "mlx_peak_mb": mx.get_peak_memory() / 2**20,
                  "weight_mb": n_bytes / 2**20, **phases}))
"""


WARM = "import numpy as np, sys; np.ones(int(sys.argv[1]) << 17)"  # MB of float64


def run_once(path: str, mode: str, root: str = str(ROOT), dtype: str | None = None,
             warm_mb: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": root}
    if mode == "first":  # only this benchmark's entries live there: start from none
        sys.path.insert(0, root)
        from mlxgen.loading import converted

        converted.clear()
    if warm_mb:
        subprocess.run([sys.executable, "-c", WARM, str(warm_mb)], check=True)
    argv = [sys.executable, "-c", CHILD, path, mode] + ([dtype] if dtype else [])
    # cwd=root: `python -c` puts the working directory first on sys.path
    out = subprocess.run(argv, env=env, check=True, cwd=root, capture_output=True, text=True,
                         timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ollama(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(req, timeout=900) as r:
        return json.loads(r.read())


def ollama_check(url: str, name: str) -> str:
    r = _ollama(url, "/api/generate", {"model": name, "stream": False, "raw": True,
                                        "prompt": "The capital of France is",
                                        "options": {"num_predict": 8, "temperature": 0}})
    if "paris" not in r.get("response", "").lower():
        raise SystemExit(f"reference Ollama's {name} answered {r.get('response')!r}: not Paris")
    return r["response"]


def ollama_cold_load(url: str, name: str) -> dict:
    _ollama(url, "/api/generate", {"model": name, "keep_alive": 0, "prompt": "", "stream": False})
    for _ in range(300):  # wait until the runner is gone: the next request loads from scratch
        if not _ollama(url, "/api/ps").get("models"):
            break
        time.sleep(0.1)
    t = time.perf_counter()
    r = _ollama(url, "/api/generate", {"model": name, "stream": False, "raw": True, "prompt": "Hi",
                                        "options": {"num_predict": 1, "temperature": 0}})
    return {"load_s": r.get("load_duration", 0) / 1e9, "request_s": time.perf_counter() - t}


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
    ap.add_argument("--warm-mb", type=int, default=0,
                    help="touch this many MB in a throwaway process before each run")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--ollama", help="reference Ollama URL, e.g. http://127.0.0.1:11535")
    ap.add_argument("--ollama-models", default="",
                    help="MODEL=OLLAMA_NAME,... (MODEL as in --models)")
    args = ap.parse_args()
    ollama_names = dict(kv.split("=", 1) for kv in args.ollama_models.split(",") if kv)
    sys.path.insert(0, str(ROOT))
    from mlxgen.loading import pypi

    results = {}
    for model in args.models.split(","):
        path = str(pypi.fetch(model)) if pypi.resolve_name(model) else model
        trees = dict(t.split("=", 1) for t in args.trees.split(","))
        modes = args.modes.split(",")
        runs: dict[str, list[dict]] = {f"{label}:{m}": [] for label in trees for m in modes}
        oname = ollama_names.get(model) if args.ollama else None
        if oname:
            print(model, "ollama answers:", repr(ollama_check(args.ollama, oname)), flush=True)
        ollama_runs = []
        if any(m == "cached" for m in modes):  # an entry for each tree's first cached run
            for tree in trees.values():  # (trees with other converter code key it apart)
                run_once(path, "first", tree, args.dtype)
        for rep in range(args.reps):
            for key in runs:  # interleaved
                label, mode = key.split(":")
                runs[key].append(run_once(path, mode, trees[label], args.dtype, args.warm_mb))
                print(model, key, rep, runs[key][-1], flush=True)
            if oname:
                ollama_runs.append(ollama_cold_load(args.ollama, oname))
                print(model, "ollama", rep, ollama_runs[-1], flush=True)
        results[model] = {
            "file_mb": os.path.getsize(path) / 2**20,
            **{mode: {k: statistics.median(r.get(k, 0.0) for r in rs)
                      for k in set().union(*rs) if k != "mlxgen"}
               for mode, rs in runs.items()},
            "runs": runs,
        }
        if ollama_runs:
            results[model]["ollama"] = {k: statistics.median(r[k] for r in ollama_runs)
                                        for k in ollama_runs[0]}
            results[model]["ollama_runs"] = ollama_runs
    # load s: until load() returns; entry written s: until a first load's background write ends
    lines = ["| model | code:mode | import s | load s | entry written s | read_gguf s | header s "
             "| tokenizer s | build s | cache read s | cache write s | RSS after import MB "
             "| peak RSS MB | MLX peak MB | weights MB | file MB |", "|---" * 16 + "|"]
    for model, r in results.items():
        for key, m in r.items():
            if key in ("file_mb", "runs", "ollama", "ollama_runs"):
                continue
            cells = [f"{m.get(k, 0.0):.2f}" for k in ("import_s", "load_s", "written_s", "read_s",
                                                       "header_s", "tokenizer_s", "build_s",
                                                       "cache_read_s", "cache_write_s")]
            cells += [f"{m[k]:.0f}" for k in ("import_rss_mb", "peak_rss_mb", "mlx_peak_mb",
                                               "weight_mb")]
            lines.append(f"| {model} | {key} | {' | '.join(cells)} | {r['file_mb']:.0f} |")
    if any("ollama" in r for r in results.values()):
        lines += ["", "| model | mlxgen code:mode | mlxgen load s | mlxgen import + load s "
                  "| Ollama load_duration s | Ollama request s | load / Ollama "
                  "| (import + load) / Ollama |", "|---" * 8 + "|"]
        for model, r in results.items():
            if "ollama" not in r:
                continue
            o = r["ollama"]
            for key, rs in r["runs"].items():  # per-run sums, then the median
                load = statistics.median(x["load_s"] for x in rs)
                total = statistics.median(x["import_s"] + x["load_s"] for x in rs)
                lines.append(f"| {model} | {key} | {load:.2f} | {total:.2f} | {o['load_s']:.2f} | "
                             f"{o['request_s']:.2f} | {load / o['load_s']:.2f} | "
                             f"{total / o['load_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1))
        head = f"medians of {args.reps} interleaved fresh-process runs"
        if args.warm_mb:
            head += f", {args.warm_mb} MB of memory touched in a throwaway process before each"
        Path(args.out + ".md").write_text(f"{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
