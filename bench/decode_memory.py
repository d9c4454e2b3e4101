"""Cold load, decode speed and process memory, the numbers a user feels beyond TTFT (issue 14):
mlxgen with quantized weights kept (the default) and dequantized (the earlier float32 path),
and optionally an Ollama server on the same GGUF.

Every mlxgen sample is a fresh process: load (wall time from the start of `mlxgen.load`), one
~100-token and one ~2,000-token prompt of fresh random text, each followed by 64 greedy tokens
with EOS ignored; decode tok/s from mlxgen's own stats; peak RSS of the process (VmHWM). Samples
of the variants are interleaved; medians are reported. For Ollama (`--ollama URL --ollama-model
NAME`): load_duration of a cold request after `keep_alive: 0`, eval_count / eval_duration for
decode, and the peak RSS of its model runner process (the server process's children).

    python bench/decode_memory.py --model qwen2.5-coder:0.5b --rounds 3 \
        [--ollama http://127.0.0.1:11535 --ollama-model qwen2.5-coder]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request

CHILD = r"""
import json, random, sys, time
t0 = time.perf_counter()
import mlxgen
t1 = time.perf_counter()
model, tok = mlxgen.load(sys.argv[1], quantized=sys.argv[2])
t2 = time.perf_counter()
out = {"import_s": t1 - t0, "load_s": t2 - t1}
rng = random.Random(0)
for n in (100, 2000):
    ids = [rng.randrange(1000, min(30000, model.args.vocab_size - 1)) for _ in range(n)]
    r = None
    for r in mlxgen.stream_generate(model, tok, ids, max_tokens=64):
        pass
    out[f"ttft_{n}"] = r.stats.ttft_s
    out[f"decode_{n}"] = r.stats.decode_tps
    out[f"decoded_{n}"] = r.stats.generation_tokens
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        out["peak_rss_mb"] = int(line.split()[1]) / 1024
print(json.dumps(out))
"""


def mlxgen_sample(model: str, quantized: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, quantized], capture_output=True,
                          text=True, check=True, env=dict(os.environ, MLXGEN_LOG_LEVEL="ERROR"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=1800) as r:
        return json.loads(r.read())


def _get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return json.loads(r.read())


def _server_pid(url: str) -> int | None:
    # bench/reference/ollama_ref.py records the pid of the server it started on each port.
    port = url.rstrip("/").rsplit(":", 1)[-1]
    cache = os.environ.get("MLXGEN_OLLAMA_REF_CACHE", "~/.cache/mlxgen/ollama-ref")
    try:
        return int(open(os.path.join(os.path.expanduser(cache), f"serve-{port}.pid")).read())
    except (OSError, ValueError):
        return None


def _runner_peak_mb(url: str) -> float | None:
    # The reference Ollama runs each model in a child "runner" process; VmHWM is its peak RSS.
    # Only this server's runners count (other servers on the machine run their own).
    server = _server_pid(url)
    best = None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"ollama" in cmd and b"runner" in cmd:
                status = open(f"/proc/{pid}/status").read().splitlines()
                ppid = int(next(l for l in status if l.startswith("PPid")).split()[1])
                if server is not None and ppid != server:
                    continue
                for line in status:
                    if line.startswith("VmHWM"):
                        best = max(best or 0, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return best


def ollama_sample(url: str, name: str) -> dict:
    words = "time year people way day man thing woman life child world school state family".split()
    rng = __import__("random").Random(time.time_ns())
    _post(f"{url}/api/generate", {"model": name, "keep_alive": 0, "prompt": "", "stream": False})
    for _ in range(100):  # wait until the runner is gone, so the next request is a cold load
        if not _get_json(f"{url}/api/ps").get("models"):
            break
        time.sleep(0.1)
    out = {}
    for n in (100, 2000):
        prompt = " ".join(rng.choice(words) for _ in range(n))
        req = {"model": name, "prompt": prompt, "raw": True, "stream": False,
               "options": {"num_predict": 64, "temperature": 0, "seed": 0, "num_ctx": 4096}}
        for attempt in range(3):
            # A request racing the unload (or a runner restart) can come back empty: no prompt
            # evaluated, no tokens. Asked again; the number of retries is recorded.
            r = _post(f"{url}/api/generate", req)
            if r.get("eval_count"):
                break
            print("ollama: empty response, asking again:", {k: v for k, v in r.items() if k != "context"},
                  file=sys.stderr, flush=True)
        out[f"retries_{n}"] = attempt
        cold = attempt == 0  # a retry finds the model loaded and the prompt maybe cached
        if n == 100:
            out["load_s"] = r.get("load_duration", 0) / 1e9 if cold else None
        out[f"ttft_{n}"] = r.get("prompt_eval_duration", 0) / 1e9 if cold else None
        # (a response that generated nothing carries no eval fields)
        out[f"decode_{n}"] = r.get("eval_count", 0) / max(r.get("eval_duration", 0) / 1e9, 1e-9) \
            if r.get("eval_count") else None
        out[f"decoded_{n}"] = r.get("eval_count", 0)
    out["peak_rss_mb"] = _runner_peak_mb(url)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ollama")
    p.add_argument("--ollama-model")
    p.add_argument("--json")
    p.add_argument("--variants", default="keep,dequantize",
                   help="mlxgen variants to run: keep (quantized weights, the default path), dequantize")
    a = p.parse_args()
    variants = a.variants.split(",") + (["ollama"] if a.ollama else [])
    runs = {v: [] for v in variants}
    if a.ollama:  # a fresh server's first answer can lack its timings: spend it here
        _post(f"{a.ollama}/api/generate", {"model": a.ollama_model, "prompt": "Hi", "stream": False,
                                           "options": {"num_predict": 1}})
    for r in range(a.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            runs[v].append(ollama_sample(a.ollama, a.ollama_model) if v == "ollama"
                           else mlxgen_sample(a.model, v))
            print(v, json.dumps(runs[v][-1]), file=sys.stderr, flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; model {a.model}; medians of {a.rounds} interleaved "
          "fresh processes; decode = 64 greedy tokens after the prompt")
    keys = ["load_s", "ttft_100", "decode_100", "ttft_2000", "decode_2000", "peak_rss_mb"]
    print("| target | load s | TTFT ~100 s | decode ~100 tok/s | TTFT ~2000 s | decode ~2000 tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        med = {k: statistics.median(x[k] for x in runs[v] if x.get(k) is not None)
               if any(x.get(k) is not None for x in runs[v]) else float("nan") for k in keys}
        name = {"keep": "mlxgen (quantized kept)", "dequantize": "mlxgen (dequantized float32)"}.get(v, "Ollama")
        print(f"| {name} | " + " | ".join(f"{med[k]:.2f}" if k != "peak_rss_mb" else f"{med[k]:.0f}"
                                          for k in keys) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "cpu": cpu, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
