"""Cache modes: the standard (post-RoPE) and pre-RoPE caches give the cache-less forward's logits
for every architecture; a stored chunk spliced at offset p equals encoding it at position p with
attention restricted to the chunk; trimming, mode selection and scattered recompute."""

import mlx.core as mx
import pytest
from reuse_helpers import ARCHS, max_diff, tiny_model, token_ids

from mlxgen import settings
from mlxgen.cache import KVCache, PreRopeKVCache, make_cache
from mlxgen.errors import ConfigError
from mlxgen.prefill import prefill
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import Composition, Segment
from mlxgen.reuse.placement import fetch

TOL = 1e-4
MODES = ("standard", "pre-rope")


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return tiny_model(request.param)


def cached_logits(model, ids, mode, split=(11, 25)):
    """Logits of every position, fed as two prefill chunks, then one token at a time."""
    cache = make_cache(len(model.layers), mode)
    a, b = split
    parts = [ids[:a], ids[a:b]] + [[t] for t in ids[b:]]
    return mx.concatenate([model(mx.array(p)[None], cache)[0] for p in parts]), cache


def test_modes_match_cacheless_forward(model):
    ids = token_ids(40)
    full = model(mx.array(ids)[None])[0]
    std, std_cache = cached_logits(model, ids, "standard")
    pre, pre_cache = cached_logits(model, ids, "pre-rope")
    assert max_diff(std, full) < TOL
    assert max_diff(pre, full) < TOL
    assert max_diff(pre, std) < TOL
    # Pre-RoPE keys are the standard keys before rotation: rotating them at 0 gives the latter.
    for layer, s, p in zip(model.layers, std_cache, pre_cache):
        assert isinstance(s, KVCache) and isinstance(p, PreRopeKVCache)
        assert s.offset == p.offset == 40
        assert max_diff(layer.self_attn.rope(p.keys[..., :40, :], 0), s.keys[..., :40, :]) < 1e-5
        assert max_diff(p.keys[..., 1:40, :], s.keys[..., 1:40, :]) > 1e-3  # really unrotated


@pytest.mark.parametrize("mode", MODES)
def test_trim_then_refeed_is_exact(mode):
    model = tiny_model("qwen3")
    ids, other = token_ids(30, seed=1), token_ids(8, seed=2)
    cache = make_cache(len(model.layers), mode)
    prefill(model, ids[:22] + other, cache, chunk_size=9)
    assert all(c.trim(len(other)) == len(other) for c in cache)
    got = prefill(model, ids[22:], cache)
    assert max_diff(got, model(mx.array(ids)[None])[:, -1]) < TOL


class _ChunkAtOffset(KVCache):
    """Reference: a chunk encoded at positions p.. with attention restricted to the chunk."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def rotate_and_update(self, q, k, v, rope):
        q, k = rope(q, self.p + self.offset), rope(k, self.p + self.offset)
        keys, values = self.update_and_fetch(k, v)
        return q, keys, values


@pytest.mark.parametrize("mode", MODES)
def test_chunk_spliced_at_offset_is_exact(model, mode):
    prefix, chunk, tail = token_ids(13, seed=3), token_ids(21, seed=4), token_ids(6, seed=5)
    p, n = len(prefix), len(chunk)
    store = ChunkStore(model, None)
    handle = store.add(chunk)
    composition = Composition([Segment(prefix), Segment(chunk, handle), Segment(tail)],
                              prefix + chunk + tail)
    cache, logits = composition.run(model, cache_mode=mode, recompute=0.0)
    assert composition.cached_tokens == n

    # Reference: prefix normally; the chunk alone at positions p..p+n-1; the tail normally.
    ref = make_cache(len(model.layers), "standard")
    prefill(model, prefix, ref)
    local = [_ChunkAtOffset(p) for _ in model.layers]
    h = model.model(mx.array(chunk)[None], local)
    for r, loc in zip(ref, local):
        r.update_and_fetch(loc.keys[..., :n, :], loc.values[..., :n, :])
    want = prefill(model, tail, ref)
    assert max_diff(logits, want) < TOL
    for layer, c, loc in zip(model.layers, cache, local):
        keys, values = fetch(c, layer.self_attn.rope)
        assert max_diff(keys[..., p : p + n, :], loc.keys[..., :n, :]) < TOL
        assert max_diff(values[..., p : p + n, :], loc.values[..., :n, :]) < TOL
    # The chunk's own logits do not depend on where it is placed.
    at_zero = model(mx.array(chunk)[None])
    assert max_diff(model.logits(h), at_zero) < TOL


@pytest.mark.parametrize("mode", MODES)
def test_full_recompute_equals_full_prefill(mode):
    model = tiny_model("llama3-rope")
    ids = token_ids(48, seed=6)
    store = ChunkStore(model, None)
    segments = [Segment(ids[:5]), Segment(ids[5:20], store.add(ids[5:20])), Segment(ids[20:24]),
                Segment(ids[24:40], store.add(ids[24:40])), Segment(ids[40:])]
    want = model(mx.array(ids)[None])[:, -1]
    for strategy in ("first", "deviation", "mixed"):
        composition = Composition(segments, ids)
        cache, logits = composition.run(model, cache_mode=mode, recompute=1.0,
                                        recompute_strategy=strategy, prefill_chunk_size=7)
        assert composition.cached_tokens == 0
        assert max_diff(logits, want) < TOL
    # With no recompute the chunks' missing context shows: the test above can fail.
    composition = Composition(segments, ids)
    _, logits = composition.run(model, cache_mode=mode, recompute=0.0)
    assert composition.cached_tokens == 31 and max_diff(logits, want) > 1e-2


def test_cache_mode_setting(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv("MLXGEN_CACHE_MODE", "pre-rope")
    assert all(isinstance(c, PreRopeKVCache) for c in model.make_cache())
    assert type(make_cache(2, "standard")[0]) is KVCache  # an argument wins
    monkeypatch.setenv("MLXGEN_CACHE_MODE", "rotated")
    with pytest.raises(ConfigError, match="MLXGEN_CACHE_MODE"):
        settings.validate_all()
    with pytest.raises(ConfigError, match="cache_mode|argument"):
        make_cache(2, "post")
