"""Tokenizer: `tokenizers` for encode/decode, jinja chat templates, streaming detokenization."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import ConfigError, MlxgenError, ModelLoadError
from .jsonfile import read_json

if TYPE_CHECKING:  # jinja2 is imported on the first chat template: not a cost of `import mlxgen`
    import jinja2

Message = dict[str, Any]


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
    ):
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.add_bos_token = add_bos_token
        self._template: jinja2.Template | None = None
        # encode_special_tokens is a flag on the shared tokenizer: flip it only under this lock.
        self._lock = threading.Lock()
        self._control: re.Pattern | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja,
        generation_config.json) as a Hugging Face model directory has them."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise ModelLoadError(
                f"{path} has no tokenizer.json; mlxgen needs the fast-tokenizer file. Re-download "
                "the model including tokenizer.json."
            )
        try:
            tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError(f"{path / 'tokenizer.json'} is corrupt ({e}); re-download it.") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()

        def token_id(tok) -> int | None:
            if isinstance(tok, dict):
                tok = tok.get("content")
            return tk.token_to_id(tok) if isinstance(tok, str) else None

        eos = {i for i in [token_id(cfg.get("eos_token"))] if i is not None}
        gen_eos = gen.get("eos_token_id")
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return cls(
            tk,
            chat_template=template,
            bos_token_id=token_id(cfg.get("bos_token")),
            eos_token_ids=sorted(eos),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def backend(self) -> HFTokenizer:
        return self._tokenizer

    def encode(
        self, text: str, add_special_tokens: bool = True, *, parse_special: bool = True
    ) -> list[int]:
        """Token ids of text. add_special_tokens: add the model's BOS etc. parse_special: turn
        control-token text ("<|im_end|>") into control tokens, as tokenizers does by default;
        False encodes it literally, as the text it is (generation does this for user text)."""
        with self._lock:
            backend = self._tokenizer
            backend.encode_special_tokens = not parse_special
            try:
                ids = backend.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                backend.encode_special_tokens = False
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render chat messages with the model's jinja template (as transformers does)."""
        if not self.chat_template:
            raise MlxgenError(
                "this tokenizer has no chat template; pass the prompt as plain text or token ids."
            )
        messages = _check_messages(messages)
        if self._template is None:
            from datetime import datetime

            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        special = {
            "bos_token": self._text_or_empty(self.bos_token_id),
            "eos_token": self._text_or_empty(min(self.eos_token_ids, default=None)),
        }
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
        )

    def encode_chat(self, messages: list[Message], **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat template, with every control-token string that came from
        a message (not from the template) encoded literally.

        Control strings inside messages are swapped for random markers before rendering, so
        after rendering every remaining control string is the template's own. A chat without
        control strings in its messages is encoded exactly as before (one pass, parsed)."""
        return self.encode_chat_split(messages, None, **kwargs)[0]

    def encode_chat_split(self, messages: list[Message], marker: str | None, **kwargs: Any
                          ) -> list[list[int]]:
        """encode_chat, with the rendered text cut at each occurrence of `marker` (a string the
        caller put in a message, e.g. where documents go): the ids of each piece, encoded apart."""
        import secrets  # chat only: not part of `import mlxgen`

        messages = _check_messages(messages)
        found: list[str] = []
        nonce = secrets.token_hex(8)

        def hide(match: re.Match) -> str:
            found.append(match.group(0))
            return f"\ue000{nonce}:{len(found) - 1}\ue001"

        control = self._control_pattern()
        messages = [_map_strings(m, lambda t: control.sub(hide, t)) for m in messages]
        text = self.apply_chat_template(messages, **kwargs)
        pieces = text.split(marker) if marker else [text]
        return [self._encode_rendered(p, found, nonce) for p in pieces]

    def _encode_rendered(self, text: str, found: list[str], nonce: str) -> list[int]:
        if not found:
            return self.encode(text, add_special_tokens=False) if text else []
        ids: list[int] = []
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        for i, part in enumerate(parts):  # template text, index of a hidden string, text, ...
            if i % 2 == 0:
                ids += self.encode(part, add_special_tokens=False) if part else []
            else:
                ids += self.encode(found[int(part)], add_special_tokens=False, parse_special=False)
        return ids

    def _control_pattern(self) -> re.Pattern:
        """Matches the text of every special (control) token, longest first."""
        if self._control is None:
            added = self._tokenizer.get_added_tokens_decoder().values()
            texts = sorted({t.content for t in added if t.special and t.content}, key=len,
                           reverse=True)
            self._control = re.compile("|".join(map(re.escape, texts)) or r"(?!)")
        return self._control

    def _text_or_empty(self, token_id: int | None) -> str:
        return (self._tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self._tokenizer)


class StreamingDetokenizer:
    """Incremental decoding that only emits complete characters (tokenizers' DecodeStream holds
    back partial UTF-8 sequences until the token that completes them arrives)."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Feed one token; return the newly completed text (may be empty)."""
        piece = self._stream.step(self._tokenizer, token_id) or ""
        self.text += piece
        return piece


def check_text(text: Any, what: str) -> str:
    """text, if it is a str that can be encoded as UTF-8 (no lone surrogates), else ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string; got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{what} is not valid Unicode text: {text[e.start:e.end]!r} at index {e.start} is a "
            "lone surrogate (often invalid UTF-8 bytes decoded with surrogateescape); fix the input."
        ) from None
    return text


def _check_messages(messages: Any) -> list[Message]:
    """Checked copies of the messages, list-of-text-parts content joined into one string."""
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    )
    if not ok or not messages:
        raise MlxgenError(
            "chat messages must be a non-empty list of {'role': str, 'content': str} dicts."
        )
    out = []
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, list):  # OpenAI-style parts: only text parts can be rendered here
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ConfigError(
                    f"messages[{i}]['content'] is a list with non-text parts; mlxgen models take "
                    "text only: give a string or a list of {'type': 'text', 'text': str} parts."
                )
            content = "".join(check_text(p.get("text"), f"messages[{i}] text part")
                              for p in content)
        check_text(content, f"messages[{i}]['content']")
        check_text(m["role"], f"messages[{i}]['role']")
        out.append({**m, "content": content})
    return out


def _map_strings(value: Any, fn) -> Any:
    """value with fn applied to every string in it (dicts and lists are copied, not changed)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise(message: str) -> None:
    raise MlxgenError(f"chat template error: {message}")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object; re-download it.")
    return data
