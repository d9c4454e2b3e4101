"""GGML K-quant blocks -> MLX affine quantized arrays (w = scale * q + bias, groups of 32).

Q4_K and Q5_K sub-blocks are 32 wide with their own scale d*sc and min dmin*m, so they repack
exactly (up to fp16 rounding of those products). Q6_K, Q3_K and Q2_K have 16-wide sub-blocks,
finer than any MLX group size, so a group of 32 mixes two scales: Q6_K goes to 8 bits on a lattice
of a quarter of the larger scale (that half exact), Q3_K/Q2_K are requantized from their values
with per-group min/max. bench/NOTES.md ("Issue 14: loading") lists the measured error per type.
Everything is vectorized over blocks; large tensors are done in row chunks to bound temporaries."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import Q4_K, dequantize as gguf_dequantize

# Per type: MLX bits of the repacked form, and whether it is exact (up to fp16 scales).
K_BITS = {QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 8, QT.Q3_K: 5, QT.Q2_K: 4}
K_EXACT = {QT.Q4_K, QT.Q5_K}
GROUP = 32
_CHUNK_ELEMENTS = 1 << 20  # rows per chunk: temporaries of a few MB each, near the caches
_MAX_WORKERS = 8  # repack threads (memory-bound passes: more cores stop helping)

Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]
Alloc = Callable[[tuple, np.dtype], np.ndarray]  # (shape, dtype) -> a writable array
# The CPU kernels' repack_blocks(raw, qtype, codes, scales, biases) -> (scales finite, biases
# finite): kernels/cpu/repack.cpp, the same bytes as the numpy passes, for these types.
Kernel = Callable[..., tuple[bool, bool]]
KERNEL_TYPES = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, ..., n) integer codes < 2**bits -> (rows, n*bits/32) uint32, MLX's bit order.

    MLX packs each row as a little-endian bit stream: element i at bits [bits*i, bits*(i+1))."""
    rows = q.shape[0]
    q = q.reshape(rows, -1).astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        return (q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    words = np.ascontiguousarray(q).view(np.uint64)
    return take_packed(compact_words(words, bits, copy=True), bits, rows)


# Word-wise packing: a uint64 holding 8 codes (one per byte) is squeezed in three halving steps
# (pairs in 16-bit lanes, quads in 32-bit lanes, then all 8), a few whole-array passes instead
# of one pass per bit field.
_LANE_LOW = [np.uint64(m) for m in (0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0x00000000FFFFFFFF)]
_LANE_HIGH = [~m for m in _LANE_LOW]


def compact_words(words: np.ndarray, bits: int, copy: bool = False) -> np.ndarray:
    """uint64 words of 8 codes < 2**bits (code k in byte k) -> the 8*bits-bit little-endian
    stream of those codes in each word's low bits; in place unless copy."""
    x = words.copy() if copy else words
    t = np.empty_like(x)
    for step, (low, high) in enumerate(zip(_LANE_LOW, _LANE_HIGH)):
        half = 8 << step  # the upper half-lane moves down over the lower one's unused bits
        np.bitwise_and(x, high, out=t)
        t >>= np.uint64(half - bits * half // 8)
        x &= low
        x |= t
    return x


def take_packed(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """compact_words' output -> (rows, -1) uint32: the low `bits` bytes of every word."""
    low_bytes = np.dtype({"names": ["b"], "formats": [f"V{bits}"], "offsets": [0], "itemsize": 8})
    return np.ascontiguousarray(words.reshape(-1).view(low_bytes)["b"]).view(np.uint8).reshape(
        rows, -1).view(np.uint32)


def _fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow shows up as inf; the caller falls back
        return x.astype(np.float16)


def _q4k_q5k(blocks: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, block_bytes) -> codes (n, 8, 32) (Q4_K: already packed, (n, 32) uint32), scales (n, 8)
    and biases (n, 8), both fp16."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # the 6-bit scale/min unpacking, shared by Q5_K
    scales, biases = _fp16(d * sc), _fp16(-(dmin * m))
    if qtype == QT.Q4_K:  # already 4-bit: reorder the nibbles straight into MLX's packing
        return _q4k_packed(blocks[:, -128:]), scales, biases
    qs = blocks[:, -128:].reshape(-1, 4, 1, 32)  # chunk j: low nibbles = sub-block 2j, high = 2j+1
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    # bit j of qh[l] is the 5th bit of element l of sub-block j
    qh = blocks[:, 16:48]
    q |= ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
    return q, scales, biases


def _q4k_packed(qs: np.ndarray) -> np.ndarray:
    """Q4_K's 128 code bytes per block -> MLX's 4-bit packing (n, 32) uint32. Chunk j of 32
    bytes holds sub-block 2j in its low nibbles and 2j+1 in its high ones; MLX wants elements
    2b and 2b+1 of a sub-block in the low and high nibble of its byte b."""
    pairs = qs.reshape(-1, 4, 16, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = np.empty((qs.shape[0], 4, 2, 16), np.uint8)
    low, high = out[:, :, 0], out[:, :, 1]
    np.left_shift(odd, 4, out=low)  # uint8: the high nibble shifts out
    low |= even & 0x0F
    np.right_shift(even, 4, out=high)
    high |= odd & 0xF0
    return out.reshape(qs.shape[0], -1).view(np.uint32)


def _q6k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K -> 8-bit codes on a lattice step S = d*sc_big/4 (sc_big: the pair's larger |scale|).

    The larger-scale half of each group of 32 lands exactly on the lattice (codes 4*(q-32));
    the other half is rounded to it (error <= S/2), bias = -128*S (exact in fp16). When the two
    scales are equal and opposite the codes would span -128..128, one too many for 8 bits: those
    groups use the step 64*d*|sc|/255 and bias -127.5 steps instead (both halves rounded, <= S/2)."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 2, 64), np.uint8)  # the 6-bit codes, built in place
    np.bitwise_and(ql, 0x0F, out=q[:, :, :1])
    np.right_shift(ql, 4, out=q[:, :, 1:])
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    high <<= 4
    q = q.reshape(n, 2, 128)
    q |= high.reshape(n, 2, 128)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.int16).reshape(n, 8, 2)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    pick = np.abs(sc[..., 1]) > np.abs(sc[..., 0])
    big = np.where(pick, sc[..., 1], sc[..., 0])
    clash = (sc[..., 0] == -sc[..., 1]) & (big != 0)
    per_step = np.where(clash, np.float32(255 / 64), np.float32(4))  # lattice steps per d*sc_big
    offset = np.where(clash, np.float32(127.5), np.float32(128))
    ratio = (per_step[..., None] * sc / np.where(big == 0, 1, big)[..., None]).astype(np.float32)
    # rint(ratio * (q - 32) + offset) in one float32 buffer (the same float32 operations)
    x = q.reshape(n, 8, 2, 16).astype(np.float32)
    x -= 32
    x *= ratio[..., None]
    x += offset[..., None, None]
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    codes = x.astype(np.uint8).reshape(n, 8, 32)
    scales = _fp16(d * big / per_step)
    return codes, scales, _fp16(-offset * scales.astype(np.float32))


def _minmax(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (n, 32k) -> codes, fp16 scales, fp16 biases by per-group min/max."""
    g = values.reshape(values.shape[0], -1, GROUP)
    lo, hi = g.min(-1), g.max(-1)
    scales, biases = _fp16((hi - lo) / (2**bits - 1)), _fp16(lo)
    s = scales.astype(np.float32)
    s = np.where(s == 0, 1, s)[..., None]
    codes = np.clip(np.rint((g - biases.astype(np.float32)[..., None]) / s), 0, 2**bits - 1)
    return codes.astype(np.uint8), scales, biases


def _requantized(qtype: QT) -> Callable[[np.ndarray], tuple]:
    return lambda blocks: _minmax(gguf_dequantize(blocks, qtype), K_BITS[qtype])


def kernel_repack(raw: np.ndarray, qtype: QT, bits: int, alloc: Alloc,
                  kernel: Kernel) -> tuple[Triplet, bool, bool]:
    """raw's rows through the CPU kernels' repack (a type in KERNEL_TYPES) into arrays from
    alloc, as in_row_chunks allocates them; with whether every scale, every bias is finite."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, elements = raw.shape[0], raw.shape[1] // block_bytes * block
    out = (alloc((rows, elements * bits // 32), np.uint32),
           alloc((rows, elements // GROUP), np.float16), alloc((rows, elements // GROUP), np.float16))
    scales_ok, biases_ok = kernel(raw, int(qtype), *out)
    return out, scales_ok, biases_ok


def repack_k(raw: np.ndarray, qtype: QT, alloc: Alloc = np.empty,
             kernel: Kernel | None = None) -> Triplet | None:
    """(rows, row_bytes) GGML K-quant rows -> MLX (packed uint32, fp16 scales, fp16 biases),
    written into arrays from alloc (see in_row_chunks); by `kernel` where given and it has the
    type (Q4_K, Q5_K, Q6_K), else in numpy.

    None when a scale or bias overflows fp16 (the caller dequantizes instead)."""
    block_bytes, bits = GGML_QUANT_SIZES[qtype][1], K_BITS[qtype]
    if kernel is not None and qtype in KERNEL_TYPES:
        triplet, scales_ok, biases_ok = kernel_repack(raw, qtype, bits, alloc, kernel)
        return triplet if scales_ok and biases_ok else None
    convert = {QT.Q4_K: lambda b: _q4k_q5k(b, QT.Q4_K), QT.Q5_K: lambda b: _q4k_q5k(b, QT.Q5_K),
               QT.Q6_K: _q6k}.get(qtype) or _requantized(qtype)

    def rows_to_mlx(rows: np.ndarray) -> Triplet:
        n = rows.shape[0]
        codes, scales, biases = convert(rows.reshape(-1, block_bytes))
        packed = codes if codes.dtype == np.uint32 else pack(codes.reshape(n, -1), bits)
        return packed.reshape(n, -1), scales.reshape(n, -1), biases.reshape(n, -1)

    packed, scales, biases = in_row_chunks(raw, qtype, rows_to_mlx, alloc)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        return None
    return packed, scales, biases



def in_row_chunks(raw: np.ndarray, qtype: QT, fn: Callable[[np.ndarray], Triplet],
                  alloc: Alloc = np.empty) -> Triplet:
    """fn over chunks of raw's rows, copied into outputs from alloc(shape, dtype): a large tensor
    (an embedding) never has all of its temporaries alive at once, and an allocator handing out
    views of MLX arrays receives the result without a whole-tensor numpy copy in between. alloc
    may return another float dtype for float16 parts (the scales), which are cast on copy.
    Chunks after the first run on a thread pool: numpy releases the GIL inside each pass."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    step = max(1, _CHUNK_ELEMENTS // (raw.shape[1] // block_bytes * block))
    first = fn(raw[:step])
    if step >= rows and alloc is np.empty:
        return first
    out = tuple(alloc((rows, *p.shape[1:]), p.dtype) for p in first)

    def store(start: int, parts: Triplet) -> None:
        for o, p in zip(out, parts):
            o[start : start + p.shape[0]] = p

    store(0, first)
    starts = range(step, rows, step)
    if len(starts) > 1 and _workers() > 1:
        work = lambda start: store(start, fn(raw[start : start + step]))  # noqa: E731
        list(_pool(os.getpid()).map(work, starts))
    else:
        for start in starts:
            store(start, fn(raw[start : start + step]))
    return out


def _workers() -> int:
    return min(_MAX_WORKERS, os.cpu_count() or 1)


@cache
def _pool(pid: int) -> ThreadPoolExecutor:
    # one per process: a forked child does not inherit the parent's worker threads
    return ThreadPoolExecutor(_workers(), thread_name_prefix="mlxgen-repack")
