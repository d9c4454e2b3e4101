"""HTTP targets: an Ollama endpoint (/api/generate) and OpenAI-compatible ones (/v1/completions:
llama.cpp's llama-server, mlx_lm.server, LM Studio). Stdlib only.

TTFT is measured by the client, from sending the request to the first chunk with non-empty text
(or to the final chunk if the only token decodes to nothing). A stream that ends without its
final chunk is a failed sample, never a measurement."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
from typing import Any, Iterator

from .prompts import Prompt
from .targets import Measurement, Target, TargetError


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname or "127.0.0.1", u.port, timeout=timeout), u.path or "/"


def request(url: str, payload: dict | None, timeout: float, stream: bool = False):
    """Send GET (payload None) or POST JSON; return (connection, response) once headers arrive.
    Raises TargetError: fatal when nothing listens or the server rejects the request (4xx)."""
    conn, path = _connection(url, timeout)
    try:
        if payload is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(payload).encode(),
                         headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
    except ConnectionRefusedError:
        conn.close()
        raise TargetError(f"endpoint down: nothing is listening at {url} (connection refused)",
                          fatal=True) from None
    except (socket.timeout, TimeoutError):
        conn.close()
        raise TargetError(f"timed out after {timeout:g} s waiting for {url} to answer") from None
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise TargetError(f"cannot reach {url}: {e or type(e).__name__}", fatal=True) from None
    if resp.status != 200:
        body = resp.read(4000).decode("utf-8", "replace")
        conn.close()
        try:
            detail = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            detail = body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        raise TargetError(f"HTTP {resp.status} from {url}: {str(detail).strip()[:300]}",
                          fatal=400 <= resp.status < 500)
    return conn, resp


def get_json(url: str, timeout: float = 5.0) -> tuple[Any, dict[str, str]]:
    conn, resp = request(url, None, timeout)
    try:
        return json.loads(resp.read() or b"null"), dict(resp.getheaders())
    except (ValueError, OSError, http.client.HTTPException) as e:
        raise TargetError(f"bad answer from {url}: {e}") from None
    finally:
        conn.close()


def stream_lines(url: str, payload: dict, timeout: float) -> Iterator[tuple[float, bytes]]:
    """(arrival time, stripped line) for each non-empty line of a streamed POST. The whole
    request must finish within `timeout`; a stall or a cut connection raises TargetError."""
    deadline = time.perf_counter() + timeout
    conn, resp = request(url, payload, timeout)
    try:
        while True:
            try:
                line = resp.readline()
            except (socket.timeout, TimeoutError):
                raise TargetError(f"timed out after {timeout:g} s: the stream stalled") from None
            except (OSError, http.client.HTTPException) as e:
                raise TargetError(f"stream cut midway: {e or type(e).__name__}") from None
            now = time.perf_counter()
            if not line:
                return
            if now > deadline:
                raise TargetError(f"timed out after {timeout:g} s: the stream did not finish")
            if line.strip():
                yield now, line.strip()
    finally:
        conn.close()


def _event(data: bytes, line: bytes) -> dict:
    """One streamed JSON event; a malformed line or an error event fails the sample."""
    try:
        msg = json.loads(data)
    except ValueError:
        raise TargetError(f"malformed stream line: {line[:100]!r}") from None
    if "error" in msg:
        raise TargetError(f"server error mid-stream: {msg['error']}")
    return msg


def _cut(chunks: int, what: str) -> TargetError:
    return TargetError(f"stream cut midway: the connection closed after {chunks} chunks "
                       f"without {what}")


class OllamaTarget(Target):
    kind = "ollama"

    def __init__(self, url: str, model: str, num_ctx: int, timeout: float = 120.0,
                 name: str = "ollama"):
        self.url, self.model, self.num_ctx, self.timeout = url.rstrip("/"), model, num_ctx, timeout
        self.name = name
        self.version: str | None = None
        self.load_note = "cold load request (client wall time); server load_duration in info"
        self.server_load_s: float | None = None
        self.cold_server_load_s: float | None = None  # load_duration of the last cold()

    def _options(self, max_tokens: int) -> dict:
        # A fixed num_ctx for every request: a change would reload the model mid-benchmark,
        # and Ollama's default context would silently truncate long prompts.
        return {"num_predict": max_tokens, "temperature": 0, "num_ctx": self.num_ctx}

    def setup(self) -> None:
        version, _ = get_json(f"{self.url}/api/version")
        self.version = (version or {}).get("version")
        conn, resp = request(f"{self.url}/api/show", {"model": self.model}, 10.0)  # 404: unknown
        conn.close()
        # Unload, then time a bare load so the load is reported and excluded from every TTFT.
        for keep_alive in (0, "30m"):
            start = time.perf_counter()
            payload = {"model": self.model, "keep_alive": keep_alive, "stream": False,
                       "options": self._options(1)}
            conn, resp = request(f"{self.url}/api/generate", payload, self.timeout)
            done = json.loads(resp.read() or b"{}")
            conn.close()
        self.load_s = time.perf_counter() - start
        self.server_load_s = done.get("load_duration", 0) / 1e9 or None

    def run(self, prompt: Prompt, max_tokens: int = 1) -> Measurement:
        payload = {"model": self.model, "prompt": prompt.text, "raw": True, "stream": True,
                   "keep_alive": "30m", "options": self._options(max_tokens)}
        start = time.perf_counter()
        first = final = None
        chunks = 0
        for t, line in stream_lines(f"{self.url}/api/generate", payload, self.timeout):
            msg = _event(line, line)
            chunks += 1
            if first is None and msg.get("response"):
                first = t
            if msg.get("done"):
                final = (t, msg)
                break
        if final is None:
            raise _cut(chunks, "the final done chunk")
        done = final[1]
        ns = lambda key: done[key] / 1e9 if isinstance(done.get(key), (int, float)) else None
        return Measurement(
            (first or final[0]) - start,
            server_prompt_tokens=done.get("prompt_eval_count"),
            server_prefill_s=ns("prompt_eval_duration"),
            server_load_s=ns("load_duration"),
            extra={"empty_first_token": first is None, "done_reason": done.get("done_reason")},
        )

    def cold(self, prompt: Prompt, max_tokens: int = 1) -> float | None:
        """Unload the model (`keep_alive: 0`), wait until /api/ps no longer lists it, then time
        one request: load + prefill + first token."""
        conn, resp = request(f"{self.url}/api/generate",
                             {"model": self.model, "keep_alive": 0, "stream": False}, self.timeout)
        resp.read()
        conn.close()
        names = {self.model, f"{self.model}:latest"}
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            ps, _ = get_json(f"{self.url}/api/ps")
            if not names & {m.get("name") for m in (ps or {}).get("models") or []}:
                break
            time.sleep(0.1)
        else:
            raise TargetError(f"Ollama did not unload {self.model} within 60 s")
        m = self.run(prompt, max_tokens)
        self.cold_server_load_s = m.server_load_s
        return m.ttft_s

    def info(self) -> dict[str, Any]:
        return {**super().info(), "url": self.url, "model": self.model, "version": self.version,
                "num_ctx": self.num_ctx, "server_load_s": self.server_load_s}


class OpenAITarget(Target):
    kind = "openai"

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0,
                 name: str | None = None):
        url = url.rstrip("/")
        self.url = url.removesuffix("/v1")
        self.model, self.timeout = model, timeout
        self.name = name or f"openai@{urllib.parse.urlsplit(self.url).netloc}"
        self.load_note = "loaded by the server before the run (not measured)"
        self.server: dict[str, Any] = {}

    def setup(self) -> None:
        models, headers = get_json(f"{self.url}/v1/models")
        self.server["models"] = [m.get("id") for m in (models or {}).get("data", [])][:10]
        self.server["server_header"] = headers.get("Server")
        try:  # llama-server describes its build here; others lack it
            props, _ = get_json(f"{self.url}/props", timeout=2.0)
            if isinstance(props, dict) and "build_info" in props:
                self.server["build_info"] = props["build_info"]
        except TargetError:
            pass

    def run(self, prompt: Prompt, max_tokens: int = 1) -> Measurement:
        payload: dict[str, Any] = {"prompt": prompt.text, "max_tokens": max_tokens, "stream": True,
                                   "temperature": 0, "stream_options": {"include_usage": True}}
        if self.model:
            payload["model"] = self.model
        start = time.perf_counter()
        first = end = None
        usage: dict = {}
        timings: dict = {}
        chunks = 0
        for t, line in stream_lines(f"{self.url}/v1/completions", payload, self.timeout):
            if not line.startswith(b"data:"):  # SSE comments (keep-alives) and event names
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                end = end or t
                break
            msg = _event(data, line)
            chunks += 1
            usage = msg.get("usage") or usage
            timings = msg.get("timings") or timings
            for choice in msg.get("choices") or []:
                if first is None and choice.get("text"):
                    first = t
                if choice.get("finish_reason") and end is None:
                    end = t
        if end is None:
            raise _cut(chunks, "a finish_reason or [DONE]")
        details = usage.get("prompt_tokens_details") or {}
        return Measurement(
            (first or end) - start,
            server_prompt_tokens=usage.get("prompt_tokens", timings.get("prompt_n")),
            server_prefill_s=timings["prompt_ms"] / 1e3 if "prompt_ms" in timings else None,
            cached_tokens=details.get("cached_tokens", timings.get("cache_n")),
            extra={"empty_first_token": first is None, "timings": timings or None},
        )

    def info(self) -> dict[str, Any]:
        return {**super().info(), "url": self.url, "model": self.model, **self.server}
