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
