"""The GGUF repack as it was before the load-speed work (issue 14), frozen: the faster code in
mlxgen/loading must produce exactly these bytes (tests/test_gguf_repack_speed.py)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

NATIVE_BITS = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    rows = q.shape[0]
    q = q.reshape(rows, -1).astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        return (q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    if bits == 5:
        e = [q[:, k::8] for k in range(8)]
        out = [e[0] | (e[1] << 5), (e[1] >> 3) | (e[2] << 2) | (e[3] << 7),
               (e[3] >> 1) | (e[4] << 4), (e[4] >> 4) | (e[5] << 1) | (e[6] << 6),
               (e[6] >> 2) | (e[7] << 3)]
    elif bits == 6:
        e = [q[:, k::4] for k in range(4)]
        out = [e[0] | (e[1] << 6), (e[1] >> 2) | (e[2] << 4), (e[2] >> 4) | (e[3] << 2)]
    else:
        b = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]
        return np.packbits(b.reshape(rows, -1), axis=-1, bitorder="little").view(np.uint32)
    return np.stack(out, axis=-1).reshape(rows, -1).view(np.uint32)


def repack_native(raw: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    f16 = lambda a, b: blocks[..., a:b].copy().view(np.float16)[..., 0]
    d = f16(0, 2)
    with np.errstate(over="ignore"):
        offset = -d * np.float16(128 if qtype == QT.Q8_0 else 16 if qtype == QT.Q5_0 else 8)
    if qtype == QT.Q8_0:
        return pack(blocks[..., 2:] ^ 0x80, 8), d, offset
    low_at = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q5_0: 6, QT.Q5_1: 8}[qtype]
    qs = blocks[..., low_at:]
    bits = NATIVE_BITS[qtype]
    bias = f16(2, 4) if qtype in (QT.Q4_1, QT.Q5_1) else offset
    if bits == 4:
        even, odd = qs[..., 0::2], qs[..., 1::2]
        packed = np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], -1)
        return packed.reshape(raw.shape[0], -1).view(np.uint32), d, bias
    high = np.unpackbits(blocks[..., low_at - 4 : low_at], axis=-1, bitorder="little")
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (high << 4)
    return pack(q, bits), d, bias


# --- K-quants (the old gguf_quants.py below pack) ------------------------------------------------
from typing import Callable  # noqa: E402

from gguf.quants import Q4_K, dequantize as gguf_dequantize  # noqa: E402

K_BITS = {QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 8, QT.Q3_K: 5, QT.Q2_K: 4}
GROUP = 32
_CHUNK_ELEMENTS = 1 << 22
Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]


def _fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow shows up as inf; the caller falls back
        return x.astype(np.float16)


def _q4k_q5k(blocks: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, block_bytes) -> codes (n, 8, 32), scales (n, 8) and biases (n, 8), both fp16."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # the 6-bit scale/min unpacking, shared by Q5_K
    qs = blocks[:, -128:].reshape(-1, 4, 1, 32)  # chunk j: low nibbles = sub-block 2j, high = 2j+1
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    if qtype == QT.Q5_K:  # bit j of qh[l] is the 5th bit of element l of sub-block j
        qh = blocks[:, 16:48]
        q |= ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
    return q, _fp16(d * sc), _fp16(-(dmin * m))


def _q6k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K -> 8-bit codes on a lattice step S = d*sc_big/4 (sc_big: the pair's larger |scale|).

    The larger-scale half of each group of 32 lands exactly on the lattice (codes 4*(q-32));
    the other half is rounded to it (error <= S/2), bias = -128*S (exact in fp16). When the two
    scales are equal and opposite the codes would span -128..128, one too many for 8 bits: those
    groups use the step 64*d*|sc|/255 and bias -127.5 steps instead (both halves rounded, <= S/2)."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 128)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low | (high.reshape(n, 2, 128) << 4)).astype(np.int16) - 32
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.int16).reshape(n, 8, 2)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    pick = np.abs(sc[..., 1]) > np.abs(sc[..., 0])
    big = np.where(pick, sc[..., 1], sc[..., 0])
    clash = (sc[..., 0] == -sc[..., 1]) & (big != 0)
    per_step = np.where(clash, np.float32(255 / 64), np.float32(4))  # lattice steps per d*sc_big
    offset = np.where(clash, np.float32(127.5), np.float32(128))
    ratio = (per_step[..., None] * sc / np.where(big == 0, 1, big)[..., None]).astype(np.float32)
    codes = np.rint(ratio[..., None] * q.reshape(n, 8, 2, 16) + offset[..., None, None])
    codes = np.clip(codes, 0, 255).astype(np.uint8).reshape(n, 8, 32)
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


def repack_k(raw: np.ndarray, qtype: QT) -> Triplet | None:
    """(rows, row_bytes) GGML K-quant rows -> MLX (packed uint32, fp16 scales, fp16 biases).

    None when a scale or bias overflows fp16 (the caller dequantizes instead)."""
    block_bytes, bits = GGML_QUANT_SIZES[qtype][1], K_BITS[qtype]
    convert = {QT.Q4_K: lambda b: _q4k_q5k(b, QT.Q4_K), QT.Q5_K: lambda b: _q4k_q5k(b, QT.Q5_K),
               QT.Q6_K: _q6k}.get(qtype) or _requantized(qtype)

    def rows_to_mlx(rows: np.ndarray) -> Triplet:
        n = rows.shape[0]
        codes, scales, biases = convert(rows.reshape(-1, block_bytes))
        return pack(codes.reshape(n, -1), bits), scales.reshape(n, -1), biases.reshape(n, -1)

    packed, scales, biases = in_row_chunks(raw, qtype, rows_to_mlx)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        return None
    return packed, scales, biases


def in_row_chunks(raw: np.ndarray, qtype: QT, fn: Callable[[np.ndarray], Triplet]) -> Triplet:
    """fn over chunks of raw's rows, into preallocated outputs: a large tensor (an embedding)
    never has all of its temporaries alive at once."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    step = max(1, _CHUNK_ELEMENTS // (raw.shape[1] // block_bytes * block))
    if step >= rows:
        return fn(raw)
    out = None
    for start in range(0, rows, step):
        parts = fn(raw[start : start + step])
        if out is None:
            out = tuple(np.empty((rows, *p.shape[1:]), p.dtype) for p in parts)
        for o, p in zip(out, parts):
            o[start : start + p.shape[0]] = p
    return out
