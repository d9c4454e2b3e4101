"""Statistics and fairness rules of the TTFT harness: percentiles, the run schedule, the
token-count check and the FLOP count of a prefill."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

MISMATCH_TOLERANCE = 0.02  # a server counting > 2% more or fewer prompt tokens is flagged


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p90(values: Sequence[float]) -> float:
    return percentile(values, 90)


def count_mismatch(ours: int, server: int | None, tolerance: float = MISMATCH_TOLERANCE) -> bool:
    """True when the server tokenized the prompt to a count more than `tolerance` away from ours
    (the TTFTs then compare different amounts of work). Unknown server counts are not flagged."""
    if server is None or ours <= 0:
        return False
    return abs(server - ours) / ours > tolerance


def schedule(targets: Sequence[str], reps: int, warmup: int = 1) -> list[tuple[str, int, bool]]:
    """(target, rep, is_warmup) in run order. Targets are interleaved run by run, and the order
    rotates every round so no target always runs first (just after another's heavy work) or last.
    Warm-up rounds come first and use negative rep numbers."""
    runs: list[tuple[str, int, bool]] = []
    n = len(targets)
    for r in range(warmup + reps):
        rep = r - warmup
        shift = r % n if n else 0
        for name in list(targets[shift:]) + list(targets[:shift]):
            runs.append((name, rep, rep < 0))
    return runs


@dataclass
class Sample:
    """One request: a TTFT on success, an error message on failure."""

    target: str
    length: int  # the requested prompt length
    rep: int  # < 0 for warm-up runs
    ok: bool
    prompt_tokens: int  # our tokenizer's count of what was sent
    nonce: str = ""
    ttft_s: float | None = None
    server_prompt_tokens: int | None = None
    server_prefill_s: float | None = None  # the server's own prompt-processing time
    server_load_s: float | None = None
    cached_tokens: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def warmup(self) -> bool:
        return self.rep < 0


@dataclass
class Row:
    """Summary of one (target, prompt length) cell."""

    target: str
    length: int
    n: int  # successful measured runs
    failed: int
    median_s: float
    p90_s: float
    prompt_tokens: int
    server_prompt_tokens: int | None
    mismatch: bool
    server_prefill_s: float | None
    gflops: float | None  # achieved prefill FLOP rate
    errors: list[str] = field(default_factory=list)


def summarize(samples: Sequence[Sample], flops_of=None) -> list[Row]:
    """One Row per (target, length), warm-ups excluded; `flops_of(n_tokens)` adds GFLOP/s."""
    rows = []
    keys = sorted({(s.target, s.length) for s in samples}, key=lambda k: (k[1], _order(samples, k[0])))
    for target, length in keys:
        cell = [s for s in samples if s.target == target and s.length == length and not s.warmup]
        ok = [s for s in cell if s.ok]
        times = [s.ttft_s for s in ok]
        ours = round(median([s.prompt_tokens for s in ok])) if ok else length
        server = [s.server_prompt_tokens for s in ok if s.server_prompt_tokens is not None]
        server_n = round(median(server)) if server else None
        prefill = [s.server_prefill_s for s in ok if s.server_prefill_s is not None]
        med = median(times)
        rows.append(Row(
            target, length, len(ok), len(cell) - len(ok), med, p90(times), ours, server_n,
            any(count_mismatch(s.prompt_tokens, s.server_prompt_tokens) for s in ok),
            median(prefill) if prefill else None,
            flops_of(ours) / med / 1e9 if flops_of and ok and med > 0 else None,
            sorted({s.error for s in cell if s.error}),
        ))
    return rows


def _order(samples: Sequence[Sample], target: str) -> int:
    return next(i for i, s in enumerate(samples) if s.target == target)


def matmul_params(args) -> int:
    """Weights every prompt token is multiplied by: attention projections and the MLP of every
    layer (for a mixture of experts: the router plus the top-k experts a token is routed to).
    The embedding is a lookup and the LM head runs on the last token only, so neither counts."""
    d, hd = args.hidden_size, args.head_dim
    attn = d * hd * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
    total = 0
    for i in range(args.num_hidden_layers):
        is_moe = getattr(args, "is_moe_layer", lambda _: False)(i)
        if is_moe:
            mlp = d * args.num_experts + args.num_experts_per_tok * 3 * d * args.moe_intermediate_size
        else:
            mlp = 3 * d * args.intermediate_size
        total += attn + mlp
    return total


def prefill_flops(args, n: int) -> float:
    """FLOPs of a causal forward over n tokens:
        2 * matmul_params * n                      (one multiply-add per weight per token)
      + 2 * n^2 * layers * heads * head_dim        (QK^T and AV: 2 matmuls x 2 FLOPs x n^2/2
                                                    causal pairs x head_dim, per head and layer)
    Norms, RoPE, softmax and activations are O(n * hidden) and left out."""
    attn = 2.0 * n * n * args.num_hidden_layers * args.num_attention_heads * args.head_dim
    return 2.0 * matmul_params(args) * n + attn
