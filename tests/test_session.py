"""Session: multi-turn prefix reuse gives exactly the tokens a fresh generate gives, prefills only
new tokens, trims on divergence, and keeps its token list in step with its cache."""

import pytest
from reuse_helpers import max_diff, tiny_model
from test_generate import TEMPLATE, tiny_tokenizer

import mlxgen
from mlxgen.cache import make_cache
from mlxgen.reuse.placement import fetch
from mlxgen.errors import MlxgenError, PromptTooLongError
from mlxgen.prefill import prefill

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    tok = mlxgen.Tokenizer(tiny_tokenizer(), chat_template=TEMPLATE)
    return tiny_model("qwen3", vocab_size=tok.vocab_size), tok


def fresh(model, tok, prompt, **kw):
    return [r.token for r in mlxgen.stream_generate(model, tok, prompt, **kw)]


def check_cache_matches_tokens(model, session):
    """The session's cache holds exactly the K/V of session.tokens."""
    n = len(session.tokens)
    assert all(c.offset == n for c in session.cache)
    if n == 0:
        return
    ref = make_cache(len(model.layers), "standard")
    prefill(model, session.tokens, ref)
    for layer, c, r in zip(model.layers, session.cache, ref):
        keys, values = fetch(c, layer.self_attn.rope)
        assert max_diff(keys, r.keys[..., :n, :]) < TOL
        assert max_diff(values, r.values[..., :n, :]) < TOL


@pytest.mark.parametrize("mode", ["standard", "pre-rope"])
def test_multi_turn_reuses_prefix_exactly(tiny, mode):
    model, tok = tiny
    session = mlxgen.Session(model, tok, cache_mode=mode)
    messages = [{"role": "user", "content": "The capital of France is"}]
    for turn in range(3):
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        before = session.cached_tokens
        out = list(session.stream_generate(messages, max_tokens=6))
        tokens = [r.token for r in out]
        assert tokens == fresh(model, tok, messages, max_tokens=6), f"turn {turn}"
        stats = session.stats
        assert stats.cached_tokens + stats.prefill_tokens == stats.prompt_tokens == len(ids)
        if turn == 0:
            assert stats.cached_tokens == 0
        else:
            assert stats.cached_tokens > 0 and stats.cached_tokens <= before
            assert ids[: stats.cached_tokens] == session.tokens[: stats.cached_tokens]
        check_cache_matches_tokens(model, session)
        reply = tok.decode(tokens)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Paris?"}]


def test_edited_earlier_message_trims(tiny):
    model, tok = tiny
    session = mlxgen.Session(model, tok)
    first = [{"role": "user", "content": "Paris is lovely"},
             {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "In spring?"}]
    session.generate(first, max_tokens=4)
    edited = [dict(first[0], content="Paris is cold")] + first[1:]
    old = tok.encode(tok.apply_chat_template(first), add_special_tokens=False)
    new = tok.encode(tok.apply_chat_template(edited), add_special_tokens=False)
    common = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    tokens = [r.token for r in session.stream_generate(edited, max_tokens=4)]
    assert session.stats.cached_tokens == common
    assert tokens == fresh(model, tok, edited, max_tokens=4)
    check_cache_matches_tokens(model, session)


def test_same_prompt_twice_prefills_one_token(tiny):
    model, tok = tiny
    session = mlxgen.Session(model, tok)
    ids = tok.encode("The capital of France is Paris. Paris is")
    a = [r.token for r in session.stream_generate(ids, max_tokens=1)]
    b = [r.token for r in session.stream_generate(ids, max_tokens=1)]
    assert a == b
    assert session.stats.cached_tokens == len(ids) - 1 and session.stats.prefill_tokens == 1
    # A prompt that is a prefix of the cache (shorter) trims to it.
    c = [r.token for r in session.stream_generate(ids[:5], max_tokens=3)]
    assert c == fresh(model, tok, ids[:5], max_tokens=3) and session.stats.cached_tokens == 4


def test_early_break_keeps_cache_consistent(tiny):
    model, tok = tiny
    session = mlxgen.Session(model, tok)
    ids = tok.encode("Paris is lovely")
    for i, _ in enumerate(session.stream_generate(ids, max_tokens=20)):
        if i == 3:
            break
    assert len(session.tokens) == len(ids) + 4  # the fourth token was already fed
    check_cache_matches_tokens(model, session)
    follow = session.tokens + tok.encode(" in spring", add_special_tokens=False)
    got = [r.token for r in session.stream_generate(follow, max_tokens=4)]
    assert got == fresh(model, tok, follow, max_tokens=4)
    assert session.stats.cached_tokens == len(ids) + 4


def test_reuse_off_reset_and_bad_input(tiny, monkeypatch):
    model, tok = tiny
    ids = tok.encode("Paris is lovely")
    session = mlxgen.Session(model, tok, cache_reuse=False)
    session.generate(ids, max_tokens=2)
    session.generate(ids, max_tokens=2)
    assert session.stats.cached_tokens == 0
    session = mlxgen.Session(model, tok)
    session.generate(ids, max_tokens=2)
    session.reset()
    session.generate(ids, max_tokens=2)
    assert session.stats.cached_tokens == 0
    chunk = mlxgen.ChunkStore(model, tok).add("Paris")
    with pytest.raises(MlxgenError, match="Session takes"):
        session.generate(["Hi", chunk], max_tokens=1)
    with pytest.raises(PromptTooLongError):
        session.generate([1] * model.args.max_position_embeddings, max_tokens=1)
    assert session.tokens == []  # trimmed to the common prefix (none) before the error
    check_cache_matches_tokens(model, session)
    session.generate(ids, max_tokens=2)
    with pytest.raises(mlxgen.ConfigError, match="cache holds"):
        list(mlxgen.stream_generate(model, tok, ids[:2], cache=session.cache, max_tokens=1))
