"""The faster GGUF repack (word-wise packing, in-place passes, threads, straight into MLX buffers)
gives exactly the bytes of the implementation it replaced (tests/gguf_repack_reference.py), for
every GGML type it keeps quantized; and the faster tokenizer construction builds the same
vocabulary and merges."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).parent))
import gguf_repack_reference as ref  # noqa: E402
from gguf_fixtures import random_blocks  # noqa: E402

from mlxgen.loading import gguf as loader, gguf_quants, gguf_tokenizer  # noqa: E402

SHAPES = [(1, 256), (7, 768), (130, 512)]  # the last one spans several chunks (patched below)


def same_bytes(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(gguf_quants, "_CHUNK_ELEMENTS", 4 * 512)  # 4 rows of 512 per chunk
    monkeypatch.setattr(gguf_quants, "_MAX_WORKERS", 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_identical(bits):
    rng = np.random.default_rng(bits)
    for shape in [(1, 32), (5, 3, 64), (9, 896)]:
        q = rng.integers(0, 2**bits, shape, dtype=np.uint8)
        same_bytes([gguf_quants.pack(q, bits)], [ref.pack(q, bits)])


def _raw(qtype: QT, shape: tuple[int, int], rng) -> np.ndarray:
    if qtype in ref.K_BITS:
        return random_blocks(shape, qtype, rng)
    block, size = GGML_QUANT_SIZES[qtype]  # every byte pattern, NaN/inf fp16 scales included
    return rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)


def _reference(raw: np.ndarray, qtype: QT):
    if qtype in ref.K_BITS:
        return ref.repack_k(raw, qtype)
    return ref.in_row_chunks(raw, qtype, lambda rows: ref.repack_native(rows, qtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN scales in random native blocks
@pytest.mark.parametrize("qtype", [*ref.NATIVE_BITS, *ref.K_BITS], ids=lambda q: q.name)
def test_repack_identical(qtype, small_chunks):
    rng = np.random.default_rng(int(qtype))
    for shape in SHAPES:
        raw = _raw(qtype, shape, rng)
        with np.errstate(all="ignore"):
            want = _reference(raw, qtype)
            if qtype in ref.K_BITS:
                got = gguf_quants.repack_k(raw, qtype)
            else:
                got = gguf_quants.in_row_chunks(
                    raw, qtype, lambda rows: loader._repack_native(rows, qtype))
        same_bytes(got, want)


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_mlx_buffers_hold_the_reference_values(qtype, scale_dtype, small_chunks):
    """What the loader puts in the model: the reference bytes (scales widened exactly)."""
    rng = np.random.default_rng(7)
    raw = _raw(qtype, (130, 512), rng)
    if qtype in ref.NATIVE_BITS:  # finite scales, so the quantized form is kept
        raw.reshape(130, -1, GGML_QUANT_SIZES[qtype][1])[..., 0:2] = (
            rng.uniform(1e-3, 1e-2, (130, 16, 1)).astype(np.float16).view(np.uint8))
    t = loader.TensorInfo("w", (130, 512), qtype, 0, raw.nbytes)
    got = loader._tensor_arrays(raw.reshape(-1), t, True, scale_dtype)
    want = list(_reference(raw, qtype))
    assert all(isinstance(a, mx.array) for a in got)
    if scale_dtype == mx.float32:
        want[1:] = [w.astype(np.float32) for w in want[1:]]
    same_bytes([np.array(a) for a in got], want)


def test_vocab_keeps_first_id_and_merges_split_like_before():
    tokens = ["a", "b", "ab", "a b", "b", "c", "a bc", "bc"]
    vocab = gguf_tokenizer._vocab(tokens)
    assert vocab == {"a": 0, "b": 1, "ab": 2, "a b": 3, "c": 5, "a bc": 6, "bc": 7}
    merges = ["a b", "a b c", "b c"]  # "a b c": "a" + "b c" is not in the vocab, "a b" + "c" is
    assert gguf_tokenizer._merges(merges, vocab) == [
        gguf_tokenizer._split_merge(m, vocab) for m in merges] == [("a", "b"), ("a b", "c"),
                                                                   ("b", "c")]
    with pytest.raises(Exception, match="does not name two vocabulary tokens"):
        gguf_tokenizer._merges(["x y"], vocab)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_repack_threads_work_in_a_forked_child(small_chunks):
    """A child forked after a load has none of the parent's pool threads: it gets its own."""
    raw = random_blocks((40, 512), QT.Q4_K, np.random.default_rng(5))
    want = gguf_quants.repack_k(raw, QT.Q4_K)  # starts this process's pool
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the repack finished and matched
        code = 2
        try:
            got = gguf_quants.repack_k(raw, QT.Q4_K)
            code = 0 if all((g == w).all() for g, w in zip(got, want)) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's repack hung")
