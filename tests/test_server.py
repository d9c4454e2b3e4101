"""`mlxgen serve` as clients see it: one real server process on a loopback port, driven by the
official `ollama` and `openai` clients (and httpx for what they cannot send), serving tiny random
models (mlxgen/bench/tiny.py) so that the protocol, the pool and the reuse are what is tested."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
GREEDY = {"temperature": 0, "repeat_penalty": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(path: Path, seed: int) -> str:
    from mlxgen.bench.tiny import write_tiny_llama

    write_tiny_llama(path, seed=seed)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return str(path)


def start_server(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgen.cli", "serve", "--port", str(port), "--log-level",
         "warning", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlxgen serve exited: {proc.stdout.read()}")
        try:
            httpx.get(url + "/api/version", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mlxgen serve did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    models = {k: tiny(root / k, seed) for k, seed in (("a", 0), ("b", 1), ("c", 2))}
    proc, url = start_server(["--models", models["a"], models["b"], "--keep-alive", "-1"])
    yield url, models
    stop_server(proc)


@pytest.fixture(scope="module")
def clients(server):
    url, models = server
    return (ollama.Client(host=url), openai.OpenAI(base_url=url + "/v1", api_key="unused"),
            models)


def test_listing_and_version(server, clients):
    url, models = server
    oll, oai, _ = clients
    names = [m.model for m in oll.list().models]
    assert models["a"] in names and models["b"] in names and "smollm2:135m" in names
    assert {m.id for m in oai.models.list()} >= {models["a"], models["b"]}
    assert {m.model for m in oll.ps().models} == {models["a"], models["b"]}
    assert httpx.get(url + "/api/version").json()["version"]
    shown = oll.show(models["a"])
    assert shown.template == CHATML and shown.details.family == "llama"


def test_ollama_generate_and_chat_stream_equal_whole(clients):
    oll, _, m = clients
    opts = {**GREEDY, "num_predict": 12}
    whole = oll.generate(m["a"], "The quick brown fox", raw=True, options=opts)
    parts = list(oll.generate(m["a"], "The quick brown fox", raw=True, options=opts, stream=True))
    assert whole.response and "".join(p.response for p in parts) == whole.response
    final = parts[-1]
    assert final.done and final.done_reason == "length" and final.eval_count == 12
    assert final.prompt_eval_count == whole.prompt_eval_count > 0
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration > 0
    msgs = [{"role": "user", "content": "Hello there"}]
    reply = oll.chat(m["a"], msgs, options=opts)
    streamed = list(oll.chat(m["a"], msgs, options=opts, stream=True))
    assert reply.message.role == "assistant" and reply.message.content
    assert "".join(p.message.content for p in streamed) == reply.message.content


def test_openai_chat_and_completions(clients):
    _, oai, m = clients
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = oai.chat.completions.create(model=m["a"], messages=msgs, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.created > 0 and r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    text = r.choices[0].message.content
    chunks = list(oai.chat.completions.create(model=m["a"], messages=msgs, max_tokens=8,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    c = oai.completions.create(model=m["a"], prompt="Once upon a time", max_tokens=6,
                               temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens == 6
    streamed = list(oai.completions.create(model=m["a"], prompt="Once upon a time",
                                           max_tokens=6, temperature=0, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == c.choices[0].text


def test_two_concurrent_clients_on_two_models(clients):
    oll, _, m = clients
    opts = {**GREEDY, "num_predict": 40}
    expected = {k: oll.generate(m[k], "Two clients at once", raw=True, options=opts).response
                for k in ("a", "b")}
    got: dict[str, str] = {}

    def ask(k: str) -> None:
        client = ollama.Client(host=str(oll._client.base_url))
        got[k] = "".join(p.response for p in client.generate(
            m[k], "Two clients at once", raw=True, options=opts, stream=True))

    threads = [threading.Thread(target=ask, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected and expected["a"] != expected["b"]


def test_disconnect_mid_stream_frees_the_slot(server, clients):
    url, m = server
    oll, _, _ = clients
    # Unbounded and greedy: left alone this runs to the end of the 8192-token context (tens of
    # seconds: tiny model "a" repeats itself and never samples eos from this prompt).
    body = {"model": m["a"], "prompt": "hello there", "raw": True,
            "options": {"num_predict": -1, "temperature": 0}}
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        next(lines)
    start = time.monotonic()
    done = oll.generate(m["b"], "next please", raw=True, options={**GREEDY, "num_predict": 4})
    assert done.done and time.monotonic() - start < 8


def test_errors_have_each_apis_status_and_body(server, clients):
    url, m = server
    oll, oai, _ = clients
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate("no-such-model:1b", "hi")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model:1b", messages=[{"role": "user",
                                                                         "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["message"]
    r = httpx.post(url + "/api/chat", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(url + "/v1/chat/completions", content=b"[1, 2", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    long = "zq xv " * 9000  # far past the tiny model's 8192-token context
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(m["a"], long, raw=True)
    assert e.value.status_code == 400 and "context" in e.value.error
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=m["a"], prompt=long, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(url + "/api/generate", json={"model": m["a"], "prompt": "x",
                                                "options": {"temperature": "hot"}}, timeout=10)
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=m["a"], prompt="x", max_tokens=2, top_p=0)
    assert "top_p" in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=m["a"], prompt="x", n=2)
    # The server still answers normally.
    assert oll.generate(m["a"], "ok", raw=True, options={"num_predict": 1}).done


def _chat(oai, model, messages, reuse: bool):
    r = oai.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                    extra_body={"mlxgen": {"reuse": reuse}})
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def test_reuse_on_and_off_give_equal_greedy_output(clients):
    _, oai, m = clients
    messages = [{"role": "system", "content": "A long shared system prompt " * 20}]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"question {turn} about the fox"})
        on, n = _chat(oai, m["a"], messages, reuse=True)
        off, n_off = _chat(oai, m["a"], messages, reuse=False)
        assert on == off and n_off == 0
        cached.append(n)
        messages.append({"role": "assistant", "content": on})
    assert cached[1] > 100 and cached[2] > cached[1]  # the conversation so far was reused


def test_prefix_cache_never_serves_another_model_or_prompt(clients):
    _, oai, m = clients
    prompt = [{"role": "user", "content": "Identical prompt for two models " * 10}]
    _chat(oai, m["a"], prompt, reuse=True)  # a's K/V for exactly these tokens are now cached
    b_on, cached = _chat(oai, m["b"], prompt, reuse=True)
    b_off, _ = _chat(oai, m["b"], prompt, reuse=False)
    assert cached == 0 and b_on == b_off  # b (same tokenizer, other weights) got nothing of a's
    other = [{"role": "user", "content": "Identical prompt for two models " * 9 + "but not"}]
    on, cached = _chat(oai, m["a"], other, reuse=True)
    off, _ = _chat(oai, m["a"], other, reuse=False)
    assert 0 < cached < len("Identical prompt for two models " * 10) and on == off


def test_documents_extension_reuses_chunks(server, clients):
    url, m = server
    body = {"model": m["a"], "prompt": " Question: what is in the report?", "max_tokens": 8,
            "temperature": 0, "mlxgen": {"documents": ["The report says the fox is quick. " * 8]}}
    first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    off = httpx.post(url + "/v1/completions", timeout=60,
                     json={**body, "mlxgen": {**body["mlxgen"], "reuse": False}}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 40
    assert off["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]
    # One document sits at position 0, where a stored chunk is exact: same greedy text.
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == off["choices"][0]["text"]
    bad = httpx.post(url + "/v1/completions", json={**body, "mlxgen": {"documents": "x"}},
                     timeout=10)
    assert bad.status_code == 400 and "documents" in bad.json()["error"]["message"]
    long = httpx.post(url + "/v1/completions", timeout=30,
                      json={**body, "mlxgen": {"documents": ["zq xv " * 3000] * 3}})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    ask = dict(model=m["a"], messages=[{"role": "user", "content": "Summarise it."}],
               max_tokens=4, temperature=0, extra_body={"mlxgen": {"documents": ["A fox. " * 9]}})
    oai.chat.completions.create(**ask)
    assert oai.chat.completions.create(**ask).usage.prompt_tokens_details.cached_tokens > 20
    memory = httpx.get(url + "/mlxgen/memory").json()
    assert memory["chunk_store_bytes"] > 0 and memory["weights_bytes"] > 0


def test_documents_are_stored_after_the_prompts_head(server):
    """Chat documents go after the template head (system prompt, start of the user turn) and
    are stored with it as context: a repeated request reuses them, another system prompt gets
    its own."""
    url, m = server
    doc = "The ledger lists seven lanterns and a brass bell. " * 6

    def ask(system: str, reuse: bool = True, docs: int = 1) -> tuple[str, int, int]:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": m["a"], "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "What does the ledger list?"}],
            "mlxgen": {"documents": [doc] * docs, "reuse": reuse}}).json()
        stored = httpx.get(url + "/mlxgen/memory").json()["chunk_store_bytes"]
        return (r["choices"][0]["message"]["content"],
                r["usage"]["prompt_tokens_details"]["cached_tokens"], stored)

    before = httpx.get(url + "/mlxgen/memory").json()["chunk_store_bytes"]
    text, _, first = ask("You keep the ledger.")
    again, cached, second = ask("You keep the ledger.")
    assert first > before and second == first and cached > 40  # reused, nothing new stored
    off, off_cached, _ = ask("You keep the ledger.", reuse=False)
    assert off_cached == 0 and text == again == off  # right after its head the chunk is exact
    _, _, other = ask("You audit the ledger.")
    assert other - second == first - before  # another head: the document stored again
    # Twice: the second copy follows a document, so it is stored again (after the stand-in).
    # Stored after a context, so the default recomputes its first 20% ("first"), not 15%
    # ("mixed"); the first copy, right after its head, is exact.
    # The head is served from the store too (it keeps the head's K/V): counted as cached.
    from mlxgen import load

    n = len(load(m["a"])[1].encode(doc, add_special_tokens=False))
    _, one, _ = ask("You audit the ledger.")
    _, twice, stored = ask("You audit the ledger.", docs=2)
    assert one > n and cached > n  # the head and the document
    assert stored - other == first - before and twice == one + n - math.ceil(0.2 * n)


def test_documents_after_the_first_are_stored_after_a_stand_in(server):
    """A document's stored K/V depend on whether it opens the documents (after the head) or
    follows another (after the head and reuse.stand_in's document): the same two documents in
    the other order are stored again, in the same order they are not."""
    url, m = server
    docs = ["The ledger lists seven lanterns. " * 5, "The bell rings at noon. " * 5]

    def stored(order: list[str]) -> int:
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": m["a"], "prompt": " What does it say?", "max_tokens": 2, "temperature": 0,
            "mlxgen": {"documents": order}})
        assert r.status_code == 200
        return httpx.get(url + "/mlxgen/memory").json()["chunk_store_bytes"]

    before = httpx.get(url + "/mlxgen/memory").json()["chunk_store_bytes"]
    first = stored(docs)
    assert stored(docs) == first > before
    swapped = stored(docs[::-1])
    assert swapped - first == first - before  # each document in its other role: stored again


def test_bench_targets_measure_the_server(server):
    from mlxgen.bench.prompts import Prompt
    from mlxgen.bench.servers import OllamaTarget, OpenAITarget

    url, m = server
    prompt = Prompt(text="The quick brown fox " * 8, ids=[], nonce="t")
    for target in (OllamaTarget(url, m["a"], num_ctx=4096), OpenAITarget(url, m["a"])):
        target.setup()
        measured = target.run(prompt)
        assert measured.ttft_s > 0 and measured.server_prompt_tokens > 0


def test_cli_generate_through_the_server(server, clients):
    url, m = server
    oll, _, _ = clients
    expected = oll.generate(m["a"], "From the command line", raw=True,
                            options={"num_predict": 6, "temperature": 0, "top_p": 1,
                                     "top_k": 0, "repeat_penalty": 1}).response
    out = subprocess.run(
        [sys.executable, "-m", "mlxgen.cli", "generate", "--model", m["a"], "--prompt",
         "From the command line", "--max-tokens", "6"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "MLXGEN_SERVER": url})
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == expected and "server" in out.stderr


def test_keep_alive_zero_unloads(server, clients):
    oll, _, m = clients
    oll.generate(m["c"], "load me", raw=True, options={"num_predict": 1}, keep_alive=0)
    assert m["c"] not in {p.model for p in oll.ps().models}
    for k in ("a", "b"):  # a load-only request with keep_alive 0 unloads, as in Ollama
        assert oll.generate(m[k], keep_alive=0).done_reason == "unload"
    assert oll.ps().models == []


def test_keep_alive_durations_parse_as_ollama_does():
    import math

    from mlxgen.errors import ConfigError
    from mlxgen.server.pool import parse_keep_alive

    assert parse_keep_alive(None, 7.0) == 7.0 and parse_keep_alive(0) == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("250ms") == 0.25 and parse_keep_alive(12.5) == 12.5
    assert parse_keep_alive(-1) == parse_keep_alive("-1m") == math.inf
    for bad in ("soon", "5 m", "m", [], True, "1h30"):
        with pytest.raises(ConfigError, match="keep_alive"):
            parse_keep_alive(bad)


def test_prefix_cache_is_bounded_and_keyed_by_fingerprint():
    import mlx.core as mx

    from mlxgen.cache import KVCache
    from mlxgen.server.prefix_cache import PrefixCache

    class Model:  # what PrefixCache asks of a model
        def make_cache(self):
            return [KVCache()]

    def filled(n: int) -> list:
        c = KVCache()
        c.update_and_fetch(mx.ones((1, 2, n, 8)), mx.ones((1, 2, n, 8)))
        return [c]

    one = filled(10)[0].keys.nbytes * 2  # one entry's allocated bytes (a 256-token step)
    pc = PrefixCache(max_bytes=2 * one)
    pc.put("A", list(range(10)), filled(10))
    pc.put("B", list(range(10)), filled(10))
    cache, held = pc.take("C", Model(), list(range(12)))  # no entry of model C
    assert held == [] and cache[0].offset == 0
    cache, held = pc.take("A", Model(), list(range(5)) + [99, 98])  # diverges at 5: a copy
    assert held == list(range(5)) and cache[0].offset == 5 and len(pc) == 2
    cache, held = pc.take("B", Model(), list(range(14)))  # a whole prefix: taken and extended
    assert held == list(range(10)) and len(pc) == 1
    pc.put("A", [7] * 10, filled(10))
    pc.put("A", [8] * 10, filled(10))  # over budget: the least recent ("A", 0..9) goes
    assert len(pc) == 2 and pc.nbytes <= 2 * one
    assert pc.take("A", Model(), list(range(12)))[1] == []


def test_pool_evicts_least_recently_used_past_the_memory_budget(server):
    from mlxgen.server.pool import ModelPool
    from mlxgen.server.prefix_cache import PrefixCache

    _, m = server
    pool = ModelPool(None, PrefixCache(1 << 20))
    a, _ = pool.acquire(m["a"])
    pool.release(a, 60)
    pool.max_memory = int(a.nbytes * 1.5)  # room for one tiny model, not two
    b, load_s = pool.acquire(m["b"])
    assert load_s > 0 and [e.name for e in pool.loaded()] == [m["b"]]
    busy, _ = pool.acquire(m["b"])  # b is in use: loading a must not evict it
    a, _ = pool.acquire(m["a"])
    assert {e.name for e in pool.loaded()} == {m["a"], m["b"]}
    for e in (a, b, busy):
        pool.release(e, 0)
    assert pool.loaded() == []


def test_worker_runs_jobs_in_arrival_order_and_skips_cancelled_ones():
    import asyncio

    from mlxgen.server.worker import END, Job, Worker

    async def main() -> list:
        loop, ran = asyncio.get_running_loop(), []
        jobs = [Job(lambda j, i=i: (time.sleep(0.02), ran.append(i)), loop) for i in range(5)]
        jobs[3].cancel.set()  # its client left while it waited
        worker = Worker()
        for j in jobs:
            worker.submit(j)
        for j in jobs:
            while await j.get() is not END:
                pass
        worker.stop()
        return ran

    assert asyncio.run(main()) == [0, 1, 2, 4]


def test_serve_with_a_bad_model_is_one_error_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlxgen.cli", "serve", "--port", str(free_port()), "--models",
         str(tmp_path / "missing.gguf")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "mlxgen: error:" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "missing.gguf" in out.stderr
