"""Build a `tokenizers.Tokenizer` from the tokenizer metadata embedded in a GGUF file.

Input is a plain dict of GGUF metadata values (`{"tokenizer.ggml.tokens": [...], ...}`), as
returned by `mlxgen.loading.gguf.read_gguf_header(path).metadata`; `gguf.GGUFReader.fields` works
too (fields are unwrapped with `.contents()`). The tokenizer never adds BOS itself: callers check
`add_bos_token`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, as published in each model family's tokenizer.json.
_GPT2 = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = [r"\p{N}", _GPT2]  # every digit split off first, then the GPT-2 regex
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": [_GPT2], "gpt2": [_GPT2],
    "llama3": [_LLAMA3], "llama-bpe": [_LLAMA3], "smaug-bpe": [_LLAMA3], "dbrx": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "stablelm2": [_QWEN2],
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell", "exaone"], _DIGITS_THEN_GPT2),
}
# Families whose reference tokenizer NFC-normalizes input text.
_NFC_PRE = {"qwen2", "deepseek-r1-qwen"}
# Families whose reference tokenizer looks a whole pre-token up in the vocab before merging.
_IGNORE_MERGES_PRE = {"llama3", "llama-bpe", "smaug-bpe", "dbrx"}


_END_OF_GENERATION = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                      "<end_of_turn>", "<|end_of_text|>"}


@dataclass
class TokenizerParts:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]  # eos, eot, eom, then known end-of-turn control tokens
    add_bos_token: bool  # the caller prepends BOS; `tokenizer` never does


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> TokenizerParts:
    """Build the tokenizer described by GGUF metadata (a dict of values, or GGUFReader.fields)."""
    meta = {k: (v.contents() if hasattr(v, "contents") else v) for k, v in fields.items()
            if k.startswith("tokenizer.")}
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelLoadError(
            "GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing); use a GGUF "
            "converted with its tokenizer, e.g. by llama.cpp's convert_hf_to_gguf.py."
        )
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelLoadError(
            f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types; the file "
            "is corrupt. Re-download or re-convert it."
        )
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level "
            "BPE) and 'llama' (SentencePiece). Use a model with one of these tokenizers."
        )
    # the few non-plain tokens (control, user-defined, unknown), in id order, found vectorized
    import numpy as np  # here: a load from the converted-weights cache needs none of this module's work

    marked = np.flatnonzero(np.isin(np.asarray(types), (CONTROL, USER_DEFINED, UNKNOWN))).tolist()
    _register_added_tokens(tokenizer, [(tokens[i], types[i]) for i in marked])

    bos = meta.get("tokenizer.ggml.bos_token_id")
    candidates = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id",
                                                            "eom_token_id")]
    # Like llama.cpp, also stop on well-known end-of-turn control tokens the metadata omits
    # (Qwen's eos is <|im_end|>, but a reply may also end with <|endoftext|>).
    candidates += [i for i in marked if types[i] == CONTROL and tokens[i] in _END_OF_GENERATION]
    eos_ids: list[int] = []
    for tid in candidates:
        if tid is not None and 0 <= int(tid) < len(tokens) and int(tid) not in eos_ids:
            eos_ids.append(int(tid))
    # llama.cpp's defaults when the flag is absent: SentencePiece adds BOS, byte-level BPE does not.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    return TokenizerParts(
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        add_bos_token=add_bos,
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    # built from the end, so a duplicated string keeps its first id
    return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))


def _merges(merges_raw: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    # the first space splits almost every merge; _split_merge handles the rest (and refuses)
    return [(left, right) if sep and left in vocab and right in vocab else _split_merge(m, vocab)
            for (left, sep, right), m in zip(map(str.partition, merges_raw, repeat(" ")),
                                             merges_raw)]


def _split_merge(merge: str, vocab: dict[str, int]) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if sep and left in vocab and right in vocab:
        return left, right
    # A piece may itself contain a space: take the split whose halves are both in the vocab.
    for i, ch in enumerate(merge):
        if ch == " " and merge[:i] in vocab and merge[i + 1 :] in vocab:
            return merge[:i], merge[i + 1 :]
    raise ModelLoadError(f"GGUF tokenizer merge {merge!r} does not name two vocabulary tokens.")


def _byte_level_bpe(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges.")
    vocab = _vocab(tokens)
    pre = meta.get("tokenizer.ggml.pre") or "default"
    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        logger.warning(
            "Unknown GGUF pre-tokenizer %r; falling back to the GPT-2 split regex, so "
            "tokenization may differ slightly from the original model.", pre
        )
        regexes = [_GPT2]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(merges_raw, vocab),
            ignore_merges=pre in _IGNORE_MERGES_PRE,
        )
    )
    if pre in _NFC_PRE:
        tokenizer.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    # SentencePiece BPE repeatedly merges the adjacent pair whose union has the highest score;
    # ranking every (left, right) split of each piece by that score gives the same BPE merges.
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    # Gemma's files spell its runs-of-spaces pieces with real spaces; text is matched after
    # spaces become U+2581, so spell them that way (as transformers' GGUF conversion does).
    tokens = ["\u2581" * len(t) if len(t) > 1 and not t.strip(" ") else t for t in tokens]
    vocab = _vocab(tokens)
    mergeable = {t for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[vocab[piece]], vocab[piece], cut, left, right))
    ranked.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None or not 0 <= int(unk_id) < len(tokens):
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(r[3], r[4]) for r in ranked],
            unk_token=None if unk_id is None else tokens[int(unk_id)],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # Like llama.cpp: spaces become U+2581 and, with add_space_prefix, every text segment (the
    # start, and after each special token) gets one more, even if it already starts with a space.
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), escape]) if add_prefix else escape
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _register_added_tokens(tokenizer: Tokenizer, marked: list[tuple[str, int]]) -> None:
    # Control tokens (<|im_start|>, <s>) are special; user-defined ones (<tool_call>) are matched
    # whole like special tokens but still show up in decoded text.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in marked if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in marked if ty == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
