"""`mlxgen generate --server URL`: the same request sent to a running server (Ollama's
/api/chat or /api/generate, streamed), so repeated CLI calls do not reload the model."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from ..errors import MlxgenError


def generate_remote(url: str, model: str, prompt: str | None, chat: str | None,
                    system: str | None, sampling: dict) -> None:
    """Stream the reply to stdout and the stats to stderr, as the in-process command does."""
    options = {"num_predict": sampling["max_tokens"], "temperature": sampling["temperature"],
               "top_p": sampling["top_p"], "top_k": sampling["top_k"],
               "min_p": sampling["min_p"], "repeat_penalty": sampling["repetition_penalty"] or 1,
               "repeat_last_n": sampling["repetition_context_size"], "seed": sampling["seed"],
               "stop": sampling["stop"] or None}
    body: dict = {"model": model, "options": {k: v for k, v in options.items() if v is not None},
                  "stream": True}
    if chat is not None:
        path, key = "/api/chat", "message"
        body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": chat}]
    else:
        path, key = "/api/generate", "response"
        body.update(prompt=prompt, raw=True)
    request = urllib.request.Request(url.rstrip("/") + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise MlxgenError(f"the server at {url} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MlxgenError(f"cannot reach the server at {url} ({getattr(e, 'reason', e)}); start "
                          "one with `mlxgen serve`, or drop --server / MLXGEN_SERVER.") from None
    done = None
    with response:
        for line in response:
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise MlxgenError(f"the server failed mid-reply: {msg['error']}")
            piece = msg.get(key) or ""
            print(piece["content"] if isinstance(piece, dict) else piece, end="", flush=True)
            if msg.get("done"):
                done = msg
    print()
    if done is not None:
        ns = lambda k: done.get(k, 0) / 1e9
        print(f"[{done.get('done_reason')}] server {url}: prompt {done.get('prompt_eval_count')} "
              f"tok ({done.get('mlxgen', {}).get('cached_tokens', 0)} cached), prompt eval "
              f"{ns('prompt_eval_duration'):.3f} s, {done.get('eval_count')} tok in "
              f"{ns('eval_duration'):.3f} s, load {ns('load_duration'):.3f} s", file=sys.stderr)
