"""ChunkStore: encoding, LRU by bytes, persistence and its failure modes, segment prompts through
generate / stream_generate, and bad input."""

import dataclasses
import json
import logging

import mlx.core as mx
import pytest
from reuse_helpers import max_diff, tiny_model, token_ids
from test_generate import TEMPLATE, tiny_tokenizer, tokens_of

import mlxgen
from mlxgen.cache import make_cache
from mlxgen.errors import ChunkStoreError, ConfigError, MlxgenError
from mlxgen.reuse import ChunkStore, model_fingerprint

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    tok = mlxgen.Tokenizer(tiny_tokenizer(), chat_template=TEMPLATE)
    return tiny_model("qwen2", vocab_size=300), tok


def test_add_encodes_once_at_position_zero(tiny):
    model, tok = tiny
    store = ChunkStore(model, tok)
    text = "Paris is lovely in spring."
    chunk = store.add(text)
    assert chunk.token_ids == tuple(tok.encode(text, add_special_tokens=False))
    assert store.add(text) == chunk and store.add(list(chunk.token_ids)) == chunk
    assert store.encoded == 1 and len(store) == 1 and chunk in store
    kv = store.get(chunk)
    n = len(chunk)
    args = model.args
    assert kv.keys.shape == (len(model.layers), args.num_key_value_heads, n, args.head_dim)
    cache = make_cache(len(model.layers), "pre-rope")
    model(mx.array(chunk.token_ids)[None], cache)
    for i, c in enumerate(cache):
        assert max_diff(kv.keys[i], c.keys[0, :, :n]) < TOL
        assert max_diff(kv.values[i], c.values[0, :, :n]) < TOL
    assert store.add("Paris is lovely").key != chunk.key  # tokens are the key


def test_lru_bounded_by_bytes(tiny):
    model, _ = tiny
    probe = ChunkStore(model, None)
    one = probe.get(probe.add(token_ids(16, seed=1))).nbytes
    store = ChunkStore(model, None, max_bytes=int(2.5 * one))
    a, b, c = (store.add(token_ids(16, seed=s)) for s in (1, 2, 3))
    assert a not in store and b in store and c in store and store.nbytes == 2 * one
    store.get(b)  # b becomes most recent; re-adding a evicts c
    kv = store.get(a)
    assert a in store and b in store and c not in store and store.encoded == 4
    assert max_diff(kv.keys, probe.get(probe.add(token_ids(16, seed=1))).keys) < TOL
    with pytest.raises(ChunkStoreError, match="limit"):
        ChunkStore(model, None, max_bytes=one // 2).add(token_ids(16, seed=1))


def test_persistence_round_trip(tiny, tmp_path):
    model, tok = tiny
    first = ChunkStore(model, tok, path=tmp_path)
    chunk = first.add("The capital of France is Paris.")
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and (tmp_path / "store.json").exists()
    second = ChunkStore(model, tok, path=tmp_path)
    again = second.add("The capital of France is Paris.")
    assert second.encoded == 0 and again == chunk
    assert max_diff(second.get(again).keys, first.get(chunk).keys) == 0.0
    _, meta = mx.load(str(files[0]), return_metadata=True)
    assert meta["fingerprint"] == first.fingerprint and meta["format_version"] == "2"
    assert meta["dtype"] == "float32" and int(meta["n_tokens"]) == len(chunk)


def test_persistence_with_the_cpus_float16_cache(tmp_path, monkeypatch):
    # The CPU's default K/V dtype (the suite runs float32): chunks are stored, checked and served
    # from disk in float16, not set aside and re-encoded for a dtype mismatch.
    from mlxgen import backends

    monkeypatch.delenv("MLXGEN_KV_DTYPE", raising=False)
    model = tiny_model("qwen2", vocab_size=300)
    if backends.prepare(model, "cpu").kv_dtype != "float16":
        pytest.skip("the CPU kernels are not built here")
    assert model.kv_dtype == mx.float16
    first = ChunkStore(model, None, path=tmp_path)
    chunk = first.add(token_ids(20, seed=4))
    assert first.get(chunk).keys.dtype == mx.float16
    second = ChunkStore(model, None, path=tmp_path)
    assert second.get(second.add(token_ids(20, seed=4))).keys.dtype == mx.float16
    assert second.encoded == 0 and not list(tmp_path.glob("*.foreign")) + list(tmp_path.glob("*.corrupt"))


def _damage(file, how):
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[-9] ^= 0xFF  # inside the tensor data, past the header
        file.write_bytes(bytes(data))
    elif how == "garbage":
        file.write_bytes(b"not a safetensors file at all")
    elif how == "version":
        arrays, meta = mx.load(str(file), return_metadata=True)
        mx.save_safetensors(str(file), arrays, dict(meta, format_version="99"))


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage", "version"])
def test_damaged_file_is_never_served(tiny, tmp_path, how, caplog):
    model, tok = tiny
    good = ChunkStore(model, tok, path=tmp_path)
    chunk = good.add("Paris is lovely in spring.")
    file = next(tmp_path.glob("*.safetensors"))
    _damage(file, how)
    store = ChunkStore(model, tok, path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlxgen"):
        kv = store.get(chunk)
    assert store.encoded == 1, "a damaged file must be re-encoded, not served"
    assert "Re-encoding" in caplog.text and str(file) in caplog.text
    assert max_diff(kv.keys, good.get(chunk).keys) < TOL
    assert file.with_suffix(".corrupt").exists() and file.exists()  # set aside, then rewritten
    assert ChunkStore(model, tok, path=tmp_path).add("Paris is lovely in spring.") == chunk


def test_another_models_chunks_are_refused(tiny, tmp_path):
    model, tok = tiny
    other = tiny_model("qwen2", seed=1, vocab_size=300)  # same architecture, other weights
    assert model_fingerprint(other) != model_fingerprint(model)
    assert model_fingerprint(tiny_model("qwen2", vocab_size=300)) == model_fingerprint(model)
    theirs = ChunkStore(other, tok, path=tmp_path / "other")
    chunk = theirs.add("Paris is lovely in spring.")
    with pytest.raises(ChunkStoreError, match="another model"):
        ChunkStore(model, tok, path=tmp_path / "other")
    with pytest.raises(ChunkStoreError, match="another model"):
        mlxgen.generate(model, tok, ["Hi", chunk, "there"], max_tokens=2)
    with pytest.raises(ChunkStoreError, match="another model"):
        ChunkStore(model, tok).get(chunk)
    # A foreign file put under a key this store would read: never served; set aside (.foreign)
    # and the chunk re-encoded, so it does not block that chunk forever.
    ours = ChunkStore(model, tok, path=tmp_path / "ours")
    mine = ours.add("Paris is lovely in spring.")
    file = tmp_path / "ours" / f"{mine.key}.safetensors"
    file.write_bytes((tmp_path / "other" / f"{chunk.key}.safetensors").read_bytes())
    again = ChunkStore(model, tok, path=tmp_path / "ours")
    assert max_diff(again.get(mine).keys, ours.get(mine).keys) < TOL and again.encoded == 1
    assert file.with_suffix(".foreign").exists() and file.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ChunkStoreError, match="manifest"):
        ChunkStore(model, tok, path=tmp_path / "bad")


def test_segment_prompts_through_generate(tiny):
    model, tok = tiny
    store = ChunkStore(model, tok)
    head, doc = "<|user|>Read: ", "The capital of France is Paris."
    question = " Where?<|end|><|assistant|>"
    chunk = store.add(doc)
    ids = tok.encode(head) + list(chunk.token_ids) + tok.encode(question, add_special_tokens=False)
    plain = [r.token for r in mlxgen.stream_generate(model, tok, ids, max_tokens=8)]
    # Full recompute reproduces the plain prompt exactly; a leading chunk needs no recompute.
    # The segments carry template text written by the caller: parse_special opts in.
    full = list(mlxgen.stream_generate(model, tok, [head, chunk, question], max_tokens=8,
                                       recompute=1.0, parse_special=True))
    assert [r.token for r in full] == plain
    assert full[-1].stats.cached_tokens == 0 and full[-1].stats.prompt_tokens == len(ids)
    lead = list(mlxgen.stream_generate(model, tok, [chunk, question], max_tokens=8, recompute=0.0,
                                       parse_special=True))
    lead_ids = list(chunk.token_ids) + tok.encode(question, add_special_tokens=False)
    assert [r.token for r in lead] == tokens_of(model, tok, lead_ids, max_tokens=8)
    stats = lead[-1].stats
    assert stats.cached_tokens == len(chunk) and stats.prefill_tokens == len(lead_ids) - len(chunk)
    # A prompt ending with a chunk: its last token is prefilled for the logits.
    end = list(mlxgen.stream_generate(model, tok, [head, chunk], max_tokens=3, recompute=0.0))
    assert end[-1].stats.cached_tokens == len(chunk) - 1
    text = mlxgen.generate(model, tok, [head, chunk, chunk, question], max_tokens=4, recompute=0.0,
                           cache_mode="pre-rope")
    assert isinstance(text, str)


def test_cache_reuse_off_prefills_everything(tiny, monkeypatch):
    model, tok = tiny
    chunk = ChunkStore(model, tok).add("The capital of France is Paris.")
    monkeypatch.setenv("MLXGEN_CACHE_REUSE", "off")
    prompt = ["<|user|>", chunk, " Where?"]
    out = list(mlxgen.stream_generate(model, tok, prompt, max_tokens=5, recompute=0.0,
                                      parse_special=True))
    ids = (tok.encode("<|user|>") + list(chunk.token_ids)
           + tok.encode(" Where?", add_special_tokens=False))
    assert [r.token for r in out] == tokens_of(model, tok, ids, max_tokens=5)
    assert out[-1].stats.cached_tokens == 0
    monkeypatch.setenv("MLXGEN_CACHE_REUSE", "maybe")
    with pytest.raises(ConfigError, match="MLXGEN_CACHE_REUSE"):
        list(mlxgen.stream_generate(model, tok, prompt, max_tokens=1))


def test_bad_input(tiny):
    model, tok = tiny
    store = ChunkStore(model, tok)
    chunk = store.add("Paris")
    with pytest.raises(MlxgenError, match="segment 1 is a int"):
        mlxgen.generate(model, tok, ["Hi", 5], max_tokens=1)
    with pytest.raises(MlxgenError, match="segment 1 is a dict"):
        mlxgen.generate(model, tok, ["Hi", {"role": "user"}], max_tokens=1)
    for bad in (1.5, -0.1, float("nan"), "half"):
        with pytest.raises(ConfigError, match="recompute"):
            mlxgen.generate(model, tok, ["Hi", chunk], max_tokens=1, recompute=bad)
    with pytest.raises(ConfigError, match="recompute_strategy"):
        mlxgen.generate(model, tok, ["Hi", chunk], max_tokens=1, recompute_strategy="random")
    with pytest.raises(ConfigError, match="cache_mode|argument"):
        mlxgen.generate(model, tok, "Hi", max_tokens=1, cache_mode="rotated")
    with pytest.raises(MlxgenError, match="at least one token"):
        store.add("")
    with pytest.raises(MlxgenError, match="token ids"):
        store.add([1, 2, 10_000])
    with pytest.raises(ConfigError, match="max_bytes"):
        ChunkStore(model, tok, max_bytes=0)
    with pytest.raises(MlxgenError, match="empty"):
        mlxgen.generate(model, tok, ["", ""], max_tokens=1)
    forged = type(chunk)(chunk.key, (1, 2, 3), chunk.fingerprint, store)
    with pytest.raises(ChunkStoreError, match="altered"):
        store.get(forged)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_a_context_is_encoded_once_for_the_chunks_after_it(arch, monkeypatch):
    """Chunks stored after one context share its K/V, computed once (the last CONTEXTS_KEPT
    contexts are kept); each chunk still holds what a prefill of context + chunk gives it, a
    sliding-window model's (context longer than its window) included."""
    from mlxgen.reuse import chunk_store

    model = tiny_model(arch, vocab_size=300) if arch == "qwen2" else tiny_model(arch)
    runs = []
    encode = chunk_store.encode_context
    monkeypatch.setattr(chunk_store, "encode_context", lambda *a: runs.append(a[1]) or encode(*a))
    head, other = token_ids(40, seed=7), token_ids(9, seed=8)
    store = ChunkStore(model, None, context=head)
    docs = [token_ids(12, seed=s) for s in (1, 2, 3)]
    chunks = [store.add(d) for d in docs]
    assert store.encoded == 3 and runs == [tuple(head)]
    for doc, chunk in zip(docs, chunks):
        cache = model.make_cache("pre-rope", keep_all=True)
        model(mx.array(head + doc)[None], cache)
        kv = store.get(chunk)
        for i, c in enumerate(cache):
            assert max_diff(kv.keys[i], c.keys[0, :, 40:52]) < TOL
            assert max_diff(kv.values[i], c.values[0, :, 40:52]) < TOL
    store.add(docs[0], context=other)
    store.add(docs[1], context=token_ids(5, seed=9))  # a third context: the oldest is let go
    store.add(docs[2], context=other)
    store.add(docs[1], context=head + [1])
    assert runs == [tuple(head), tuple(other), tuple(token_ids(5, seed=9)), tuple(head + [1])]
    assert len(store._contexts) == chunk_store.CONTEXTS_KEPT
    # A context too large for the store's byte limit is used, not kept.
    one = sum(k.nbytes + v.nbytes for k, v in store._contexts[tuple(head + [1])])
    small = ChunkStore(model, None, max_bytes=chunk_store.CONTEXTS_SHARE * one - 1,
                       context=head + [1])
    small.add(docs[0])
    small.add(docs[1])
    assert runs[-2:] == [tuple(head + [1])] * 2 and not small._contexts


def test_context_keyed_store(tiny, tmp_path):
    """A chunk stored after a context holds the K/V its tokens get after that context (the
    context's own dropped), is keyed by the context too (never served for another one, in memory
    or on disk), and is exact when placed right after that context."""
    model, tok = tiny
    head, doc = tok.encode("<|user|>Read: ", parse_special=True), token_ids(12, seed=4)
    store = ChunkStore(model, tok, path=tmp_path)
    alone, after = store.add(doc), store.add(doc, context=head)
    other = store.add(doc, context=head[:-1])
    assert len({alone.key, after.key, other.key}) == 3 and store.encoded == 3
    assert after.context == tuple(head) and alone.context == ()
    assert store.add(doc, context=head) == after and store.encoded == 3
    cache = make_cache(len(model.layers), "pre-rope")
    model(mx.array(head + doc)[None], cache)
    kv, n = store.get(after), len(head)
    for i, c in enumerate(cache):
        assert max_diff(kv.keys[i], c.keys[0, :, n : n + 12]) < TOL
        assert max_diff(kv.values[i], c.values[0, :, n : n + 12]) < TOL
    assert max_diff(store.get(alone).keys, kv.keys) > 1e-3 < max_diff(store.get(other).keys, kv.keys)
    # A (context, ids) split of the same tokens is another chunk.
    assert store.add(head[-1:] + doc, context=head[:-1]).key != after.key
    # A handle whose context was swapped is refused, not served with the other's K/V.
    forged = dataclasses.replace(after, context=tuple(head[:-1]))
    with pytest.raises(ChunkStoreError, match="altered"):
        store.get(forged)
    # On disk: a file of another context under this chunk's name is set aside, never served.
    again = ChunkStore(model, tok, path=tmp_path)
    file = tmp_path / f"{after.key}.safetensors"
    file.write_bytes((tmp_path / f"{other.key}.safetensors").read_bytes())
    assert max_diff(again.get(after).keys, kv.keys) < TOL and again.encoded == 1
    assert file.with_suffix(".foreign").exists()
    # The store's default context; placed after exactly that context, the chunk is exact, and
    # the context's K/V, kept by the store, serve the head.
    by_default = ChunkStore(model, tok, context=head).add(doc)
    assert by_default.key == after.key
    q = tok.encode(" Where?", add_special_tokens=False)
    prompt = [head, after, q]
    want = [r.token for r in mlxgen.stream_generate(model, tok, head + doc + q, max_tokens=6)]
    got = list(mlxgen.stream_generate(model, tok, prompt, max_tokens=6, recompute=0.0))
    assert [r.token for r in got] == want and got[-1].stats.cached_tokens == len(head + doc)
    with pytest.raises(MlxgenError, match="token ids"):
        store.add(doc, context=[1, 2, 10_000])
