"""`mlxgen serve` benchmark: what the server adds to TTFT, and what reuse across requests saves.

1. TTFT at --tokens (512) prompt tokens: in-process mlxgen vs the same model behind `mlxgen serve`
   (its OpenAI /v1/completions and Ollama /api/generate, through mlxgen bench's own targets),
   interleaved, a fresh unique prompt per sample; medians and the served/in-process ratio.
2. A --turns (5) turn chat of ~--chat-tokens (2000) tokens through the official `openai` client,
   TTFT per turn with reuse on and off (`"mlxgen": {"reuse": false}`), interleaved repetitions
   that each start with a unique nonce; optionally the same conversation against a reference
   Ollama (--ollama-url, its native /api/chat so that num_ctx fits the conversation).
3. RAG: --docs documents through the `mlxgen.documents` extension, asked --questions questions
   in shuffled document orders, TTFT with the documents as stored chunks vs prefilled.
Writes OUT.json (every sample) and OUT.md (the tables).

    python bench/serve.py --model smollm2:135m --reps 5 --out bench/results/serve-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxgen.bench.prompts import build_prompt, new_nonce  # noqa: E402
from mlxgen.bench.stats import median  # noqa: E402

QUESTIONS = ["What happened at the ferry first?", "Which goods were sold at the market?",
             "What did the shopkeepers talk about?", "When was the square full of voices?",
             "What did the old clock do?", "Who ran along the stone wall?"]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlxgen.cli", "serve", "--port", str(port),
                             "--models", model, "--keep-alive", "-1", "--log-level", "warning",
                             *extra], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/api/version", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit("mlxgen serve exited")
            time.sleep(0.2)
    raise SystemExit("mlxgen serve did not start")


def ttft_vs_in_process(model, tokenizer, url: str, name: str, tokens: int, reps: int, log,
                       settle_s: float = 1.0):
    from mlxgen.bench.servers import OllamaTarget, OpenAITarget
    from mlxgen.bench.targets import MlxgenTarget

    targets = [MlxgenTarget(model, tokenizer, name="in-process"),
               OpenAITarget(url, name, name="served /v1/completions"),
               OllamaTarget(url, name, num_ctx=4096, name="served /api/generate")]
    for t in targets:
        t.setup()
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    for rep in range(reps + 1):  # rep 0 is a warmup
        order = targets[rep % 3:] + targets[: rep % 3]
        for t in order:
            prompt = build_prompt(tokenizer, tokens)
            time.sleep(settle_s)  # let the previous run's BLAS threads (either process) go idle
            m = t.run(prompt)
            if rep:
                samples[t.name].append(m.ttft_s)
        log(f"  ttft rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in samples.items()
                                               if v and rep))
    return samples


def _system_text(tokenizer, n_tokens: int) -> str:
    return build_prompt(tokenizer, n_tokens).text


def chat_openai(url: str, name: str, system: str, turns: int, reuse: bool, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    messages = [{"role": "system", "content": system}]
    out = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        start = time.perf_counter()
        first, text, usage = None, "", None
        for chunk in client.chat.completions.create(
                model=name, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"mlxgen": {"reuse": reuse}}):
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        out.append({"turn": turn + 1, "ttft_s": (first or time.perf_counter()) - start,
                    "prompt_tokens": usage.prompt_tokens,
                    "cached_tokens": usage.prompt_tokens_details.cached_tokens})
        messages.append({"role": "assistant", "content": text})
    return out


def chat_ollama(url: str, name: str, system: str, turns: int, max_tokens: int):
    import ollama

    client = ollama.Client(host=url, timeout=900)
    messages = [{"role": "system", "content": system}]
    out = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        start = time.perf_counter()
        first, text, final = None, "", None
        for part in client.chat(name, messages, stream=True, keep_alive="30m", options={
                "temperature": 0, "num_predict": max_tokens, "num_ctx": 4096}):
            if part.message.content:
                first = first or time.perf_counter()
                text += part.message.content
            final = part
        out.append({"turn": turn + 1, "ttft_s": (first or time.perf_counter()) - start,
                    "prompt_tokens": final.prompt_eval_count})
        messages.append({"role": "assistant", "content": text})
    return out


def rag(url: str, name: str, tokenizer, docs: int, doc_tokens: int, questions: int, reuse: bool,
        ollama: bool = False):
    """TTFT of questions over the same documents in shuffled orders: through `mlxgen.documents`
    (reuse on: stored chunks; off: prefilled), or, ollama=True, as one raw prompt to Ollama."""
    import httpx

    nonce = new_nonce()
    documents = [f"{nonce} document {i}: " + build_prompt(tokenizer, doc_tokens).text
                 for i in range(docs)]
    out = []
    rng = random.Random(0)
    for q in range(questions):
        order = documents[:]
        rng.shuffle(order)
        body = {"model": name, "prompt": f"\nQuestion: {QUESTIONS[q % len(QUESTIONS)]}\nAnswer:",
                "max_tokens": 1, "temperature": 0, "stream": False,
                "mlxgen": {"documents": order, "reuse": reuse}}
        if ollama:
            body = {"model": name, "prompt": "".join(order) + body["prompt"], "raw": True,
                    "stream": False, "keep_alive": "30m",
                    "options": {"temperature": 0, "num_predict": 1, "num_ctx": 4096}}
        start = time.perf_counter()
        r = httpx.post(url + ("/api/generate" if ollama else "/v1/completions"), json=body,
                       timeout=900).json()
        ttft = time.perf_counter() - start
        if ollama:
            out.append({"question": q + 1, "ttft_s": ttft, "prompt_tokens": r["prompt_eval_count"]})
            continue
        out.append({"question": q + 1, "ttft_s": ttft, "prompt_tokens": r["usage"]["prompt_tokens"],
                    "cached_tokens": r["usage"]["prompt_tokens_details"]["cached_tokens"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--chat-tokens", type=int, default=2000, help="conversation length at the last turn")
    p.add_argument("--chat-reps", type=int, default=3)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=400)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--ollama-url", default=None, help="a reference Ollama, e.g. http://127.0.0.1:11535")
    p.add_argument("--ollama-model", default="smollm2")
    p.add_argument("--settle", type=float, default=1.0, help="idle seconds before each TTFT run")
    p.add_argument("--skip", default="", help="comma-separated: ttft,chat,rag")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    import mlxgen

    model, tokenizer = mlxgen.load(args.model)
    proc, url = start_server(args.model, [])
    result: dict = {"model": args.model, "machine": platform.node(), "cpu_count": os.cpu_count(),
                    "args": vars(args)}
    try:
        if "ttft" not in skip:
            log("TTFT in-process vs served")
            result["ttft"] = ttft_vs_in_process(model, tokenizer, url, args.model, args.tokens,
                                                args.reps, log, args.settle)
        # The conversation's fixed part, sized so the last turn reaches ~chat_tokens.
        per_turn = 20 + args.reply_tokens
        system_tokens = args.chat_tokens - args.turns * per_turn
        if "chat" not in skip:
            result["chat"] = {"reuse": [], "no_reuse": [], "ollama": []}
            for rep in range(args.chat_reps):
                for reuse in ((True, False) if rep % 2 == 0 else (False, True)):
                    system = _system_text(tokenizer, system_tokens)
                    turns = chat_openai(url, args.model, system, args.turns, reuse,
                                        args.reply_tokens)
                    result["chat"]["reuse" if reuse else "no_reuse"].append(turns)
                    log(f"  chat rep {rep} reuse={reuse}: " + ", ".join(
                        f"{t['ttft_s']:.2f}" for t in turns))
                if args.ollama_url:
                    turns = chat_ollama(args.ollama_url, args.ollama_model,
                                        _system_text(tokenizer, system_tokens), args.turns,
                                        args.reply_tokens)
                    result["chat"]["ollama"].append(turns)
                    log(f"  chat rep {rep} ollama: " + ", ".join(f"{t['ttft_s']:.2f}"
                                                                 for t in turns))
        if "rag" not in skip:
            result["rag"] = {"reuse": [], "no_reuse": [], "ollama": []}
            for rep in range(max(1, args.chat_reps - 1)):
                for reuse in (True, False):
                    result["rag"]["reuse" if reuse else "no_reuse"].append(
                        rag(url, args.model, tokenizer, args.docs, args.doc_tokens,
                            args.questions, reuse))
                if args.ollama_url:
                    result["rag"]["ollama"].append(
                        rag(args.ollama_url, args.ollama_model, tokenizer, args.docs,
                            args.doc_tokens, args.questions, False, ollama=True))
                log(f"  rag rep {rep}: " + "; ".join(
                    f"{k} " + ", ".join(f"{t['ttft_s']:.2f}" for t in v[-1])
                    for k, v in result["rag"].items() if v))
        import httpx

        result["server_memory"] = httpx.get(url + "/mlxgen/memory").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = report(result)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(text)
    return 0


def report(r: dict) -> str:
    lines = [f"# mlxgen serve: {r['model']} on {r['machine']} ({r['cpu_count']} CPUs)", ""]
    if "ttft" in r:
        base = median(r["ttft"]["in-process"])
        lines += [f"## TTFT at {r['args']['tokens']} prompt tokens (median of "
                  f"{len(r['ttft']['in-process'])}, interleaved)", "",
                  "| target | median s | vs in-process |", "|---|---|---|"]
        for name, v in r["ttft"].items():
            lines.append(f"| {name} | {median(v):.3f} | {median(v) / base:.3f}x |")
        lines.append("")
    if "chat" in r:
        c = r["chat"]
        lines += [f"## {r['args']['turns']}-turn chat through the openai client (median TTFT s "
                  f"per turn over {len(c['reuse'])} runs)", "",
                  "| turn | prompt tokens | reuse on | cached | reuse off | off/on |"
                  + (" Ollama (own cache) |" if c["ollama"] else ""),
                  "|---|---|---|---|---|---|" + ("---|" if c["ollama"] else "")]
        for i in range(r["args"]["turns"]):
            on = median([run[i]["ttft_s"] for run in c["reuse"]])
            off = median([run[i]["ttft_s"] for run in c["no_reuse"]])
            row = (f"| {i + 1} | {c['reuse'][0][i]['prompt_tokens']} | {on:.3f} | "
                   f"{c['reuse'][0][i]['cached_tokens']} | {off:.3f} | {off / on:.1f}x |")
            if c["ollama"]:
                row += f" {median([run[i]['ttft_s'] for run in c['ollama']]):.3f} |"
            lines.append(row)
        lines.append("")
    if "rag" in r:
        g = r["rag"]
        oll = g.get("ollama")
        lines += ["## RAG: documents as stored chunks (`mlxgen.documents`), shuffled order",
                  "", "| question | prompt tokens | chunks (reuse on) | cached | prefilled (off) |"
                  + (" Ollama (one raw prompt) |" if oll else ""),
                  "|---|---|---|---|---|" + ("---|" if oll else "")]
        for i in range(len(g["reuse"][0])):
            on = median([run[i]["ttft_s"] for run in g["reuse"]])
            off = median([run[i]["ttft_s"] for run in g["no_reuse"]])
            row = (f"| {i + 1} | {g['reuse'][0][i]['prompt_tokens']} | {on:.3f} | "
                   f"{g['reuse'][0][i]['cached_tokens']} | {off:.3f} |")
            if oll:
                row += f" {median([run[i]['ttft_s'] for run in oll]):.3f} |"
            lines.append(row)
        lines.append("")
    if "server_memory" in r:
        m = r["server_memory"]
        lines += ["## Server memory at the end", "",
                  f"weights {m['weights_bytes'] / 2**20:.0f} MiB, prefix cache "
                  f"{m['prefix_cache_bytes'] / 2**20:.0f} MiB in {m['prefix_cache_entries']} "
                  f"entries, document chunks {m['chunk_store_bytes'] / 2**20:.0f} MiB", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
