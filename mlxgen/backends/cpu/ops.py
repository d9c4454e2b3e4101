"""Fast elementwise math for MLX's CPU backend, where it is the prefill bottleneck.

MLX's CPU `exp` (and so softmax, sigmoid, silu) runs ~30-100x slower per element than an add:
on a 512-token SmolLM2 prefill the attention softmax and the MLP's silu cost more than all the
matmuls together (bench/NOTES.md). Here exp(x <= 0) is computed from arithmetic MLX does fast:
a degree-7 Taylor polynomial of x / 2^8, squared 8 times, fused by mx.compile: ~5x faster than
mx.exp, absolute error <= ~8e-7 over [-87, 0] with no systematic bias (what a softmax whose
largest term is exactly 1, and a sigmoid, need). Logits stay within 1e-4 of the reference path.
Where mlxgen's C++ kernels are built (ext.py) the exp work goes to them instead (one vectorised
pass, 5-8x faster again): pass the loaded extension as `ext`; these MLX-op forms are the fallback.
Installed on CPU models by mlxgen/backends/cpu/__init__.py; the GPU path keeps mx.fast.*."""

from __future__ import annotations

import os
from types import ModuleType

import mlx.core as mx

_SQUARINGS = 8
_THREADS = min(8, os.cpu_count() or 1)  # decode attention is memory-bound: a few cores suffice
_P_SQUARINGS = 4  # the last squarings act on p = 1 + q directly
# Grouping rows by how far they see (_attend_trimmed): a group's widest row sees at most this
# factor more keys than its narrowest, plus a few keys (so a group is not cut at every row).
TRIM_SLACK, TRIM_KEYS = 1.25, 64


def _exp_nonpositive(x: mx.array) -> mx.array:
    # exp(x) = (1 + q)^(2^K) with 1 + q = exp(x / 2^K) from a Taylor polynomial. The first
    # squarings run as q <- q (2 + q), which keeps q's relative precision; the last ones square
    # p = 1 + q directly, which keeps small results' relative precision. Either alone biases a
    # softmax over thousands of keys (measured in bench/NOTES.md); together the error is unbiased.
    y = mx.maximum(x, -87.0) * (1.0 / 2**_SQUARINGS)
    q = y * (1 + y * (1 / 2 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y * (1 / 720 + y / 5040))))))
    for _ in range(_SQUARINGS - _P_SQUARINGS):
        q = q * (2.0 + q)
    p = 1.0 + q
    for _ in range(_P_SQUARINGS):
        p = p * p
    return p


@mx.compile
def _shifted_exp(scores: mx.array, row_max: mx.array) -> mx.array:
    # Fused into one pass; compiled per shape (~2 ms per new shape, so prefill chunks only).
    return _exp_nonpositive(scores - row_max)


@mx.compile
def _silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    # sigmoid(g) = (1 + sign(g) tanh(|g| / 2)) / 2 with tanh(|g| / 2) = (1 - e) / (1 + e) and
    # e = exp(-|g|): the exponent is never positive, and no `where` (which defeats fusion).
    e = _exp_nonpositive(-mx.abs(gate))
    return gate * (0.5 + 0.5 * mx.sign(gate) * (1.0 - e) / (1.0 + e)) * up


def silu_mul(gate: mx.array, up: mx.array, ext: ModuleType | None = None) -> mx.array:
    """silu(gate) * up, the SwiGLU activation."""
    if ext is not None and gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape:
        return ext.silu_mul(gate, up)
    return _silu_mul(gate, up)


def causal_bias(q_len: int, k_len: int) -> mx.array:
    """(q_len, k_len) additive mask: query i (the last q_len of k_len) sees keys <= k_len - q_len + i."""
    visible = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None, :]
    return mx.where(visible, 0.0, -mx.inf)


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None = None,
    ext: ModuleType | None = None,
) -> mx.array:
    """Attention as two BLAS matmuls around the fast exp; GQA without repeating K/V.

    q: (B, H, L, D); k, v: (B, KV, N, D); mask: None, "causal", or a bool/additive array
    broadcastable to (B, H, L, N). A single-token decode step goes to the C++ decode attention
    (one pass over the cache's keys and one over its values, shared by a KV head's query heads,
    split over the cores), else to MLX's sdpa: a compiled function would be re-traced for every
    new key length."""
    L, N = q.shape[2], k.shape[2]
    if L == 1 and not isinstance(mask, mx.array):
        if ext is not None and q.dtype == mx.float32 and k.dtype == v.dtype in (mx.float32, mx.float16):
            return ext.decode_attention(q, k, v, scale, _THREADS)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if k.dtype != q.dtype:  # a float16 cache: converted once here, not by each block's matmul
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    rows = _block_rows(q.shape[1], N)
    # A ones column on V makes the P@V matmul also return each row's softmax denominator,
    # which saves a reduction pass over the scores (measured 6-10%, bench/NOTES.md).
    v = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim == 2 and L > rows:
        return _attend_trimmed(q, k, v, scale, mask, ext)
    if mask != "causal" or L <= rows:
        return _attend(q, k, v, scale, mask, ext)
    # Causal chunks go in blocks of query rows: each block's scores stay cache-resident (~2 MB)
    # and it skips the keys after its last row (measured 1.8x at 512 x 2048, bench/NOTES.md).
    blocks = []
    for start in range(0, L, rows):
        end = min(L, start + rows)
        visible = N - L + end
        blocks.append(_attend(q[:, :, start:end], k[:, :, :visible], v[:, :, :visible], scale, mask, ext))
    return mx.concatenate(blocks, axis=2)


def _attend_trimmed(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array, ext
                    ) -> mx.array:
    """A bool (L, N) mask, e.g. queries at scattered positions (reuse's recompute pass): rows go
    in groups whose last visible keys are close, each group attending only up to its last
    visible key, so a row near the prompt's start does not pay for every key after it."""
    L, N = mask.shape
    ends = _visible_ends(mask)
    blocks, start = [], 0
    while start < L:
        end, lo, hi = start + 1, ends[start], ends[start]
        # Grow while the group's widest row sees at most TRIM_SLACK times its narrowest's keys.
        while end < L and max(hi, ends[end]) <= TRIM_SLACK * min(lo, ends[end]) + TRIM_KEYS:
            lo, hi = min(lo, ends[end]), max(hi, ends[end])
            end += 1
        blocks.append(_attend(q[:, :, start:end], k[:, :, :hi], v[:, :, :hi], scale,
                              mask[start:end, :hi], ext))
        start = end
    return mx.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]


_last_ends: tuple[mx.array, list[int]] | None = None  # (mask, its ends): reused while it is


def _visible_ends(mask: mx.array) -> list[int]:
    """1 + each row's last visible key. Every layer of a recompute pass gets the same mask object
    (recompute.forward_at): it is read back once, not once per layer."""
    global _last_ends
    if _last_ends is None or _last_ends[0] is not mask:
        _last_ends = (mask, (mask.shape[1] - mx.argmax(mask[:, ::-1], axis=-1)).tolist())
    return _last_ends[1]


def _block_rows(heads: int, keys: int, target_bytes: int = 1 << 21) -> int:
    rows = max(16, target_bytes // (heads * keys * 4))
    return 1 << (rows.bit_length() - 1)  # a power of two


def _attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, ext) -> mx.array:
    # v: (B, KV, N, D + 1), values with a ones column appended.
    B, H, L, D = q.shape
    KV, N = k.shape[1], k.shape[2]
    rep = H // KV
    # Group the query heads that share a KV head into one matrix: (B, KV, rep * L, D).
    scores = ((q * scale).reshape(B, KV, rep * L, D) @ k.swapaxes(-1, -2)).reshape(B, KV, rep, L, N)
    weights = _softmax_numerators(scores, mask, ext, B, KV, rep, L, N)
    # Normalise after the value matmul: dividing (L, D) rows is cheaper than (L, N) weights;
    # v's last column is ones, so out's last column is the denominator.
    out = weights.reshape(B, KV, rep * L, N) @ v
    return (out[..., :-1] / out[..., -1:]).reshape(B, H, L, -1)


def _softmax_numerators(scores: mx.array, mask, ext, B: int, KV: int, rep: int, L: int, N: int) -> mx.array:
    # exp(scores - row max) with masked keys at 0; the row sums come later from the ones column.
    if ext is not None and scores.dtype == mx.float32 and not isinstance(mask, mx.array):
        # One pass per row; causal visibility is computed in the kernel, no bias array.
        return ext.softmax_numerators(scores, L, N - L if mask == "causal" else -1)
    if isinstance(mask, str):
        mask = causal_bias(L, N)
    elif mask is not None and mask.dtype == mx.bool_:
        mask = mx.where(mask, 0.0, -mx.inf)
    if mask is not None:
        scores = scores + _group(mask.astype(scores.dtype), B, KV, rep, L, N)
        if ext is not None and scores.dtype == mx.float32:
            return ext.softmax_numerators(scores, L, -1)
    return _shifted_exp(scores, scores.max(axis=-1, keepdims=True))


def _group(mask: mx.array, B: int, KV: int, rep: int, L: int, N: int) -> mx.array:
    # (…, H or 1, L, N) -> (B or 1, KV or 1, rep or 1, L, N) to match the grouped scores.
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mask.reshape(mask.shape[0], 1, 1, L, N)
    return mask.reshape(mask.shape[0], KV, rep, L, N)
