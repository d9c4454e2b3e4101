"""Markdown for `mlxgen bench reuse` results (the JSON holds everything, per question too)."""

from __future__ import annotations


def _load(result: dict) -> str:
    a, b = result.get("load_avg_start"), result.get("load_avg_end")
    fmt = lambda x: "/".join(f"{v:.1f}" for v in x) if x else "?"  # noqa: E731
    return (f"{result.get('cpu_count')} CPUs, {result.get('device')}; load average (1/5/15 min) "
            f"{fmt(a)} at start, {fmt(b)} at end (shared machine: timings are noisy)")


def rag_table(rag: dict) -> str:
    q = rag["questions"]
    sizes = [x["prompt_tokens"] for x in q]
    lines = [
        f"RAG: {len(q)} questions over document sets {', '.join(rag['sets'])}, {rag['n_docs']} "
        f"stored documents of {rag['doc_tokens']} tokens per prompt ({min(sizes)}-{max(sizes)} "
        f"tokens, chat-templated); cold TTFT (full prefill, "
        f"median) {rag['cold_ttft_s']:.3f} s. Quality against that full prefill over the first "
        "32 answer tokens (teacher-forced).",
        "",
        "| store | strategy | recompute (share recomputed) | agreement mean / min / p10 | first token "
        "| identical prefix | mean KL (max) | first-token KL | TTFT | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rag["table"]:
        f = r["recompute"]
        lines.append(
            f"| {r.get('store', 'alone')} | {r['strategy']} | {f if isinstance(f, str) else f'{f:.2f}'} "
            f"({r['recomputed']:.1%}) | {r['agreement']:.1%} / {r['agreement_min']:.1%} / "
            f"{r['agreement_p10']:.1%} | {r['first_agreement']:.0%} | {r['prefix']:.1f} / "
            f"{r['n']:.1f} | {abs(r['kl']):.4f} ({r['kl_max']:.3f}) | {abs(r['kl_first']):.4f} | "
            f"{r['ttft_s']:.3f} s | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines)


def chat_table(rows: list[dict], title: str) -> str:
    lines = [
        title, "",
        "| turn | prompt tokens | cold: prefilled / TTFT | session: prefilled (cached) / TTFT "
        "| speedup |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['turn']} | {r['prompt_tokens']} | {r['cold_prefill_tokens']} / "
            f"{r['cold_ttft_s']:.3f} s | {r['session_prefill_tokens']} "
            f"({r['session_cached_tokens']}) / {r['session_ttft_s']:.3f} s | "
            f"{r['cold_ttft_s'] / r['session_ttft_s']:.1f}x |"
        )
    return "\n".join(lines)


def write_report(result: dict) -> str:
    parts = [f"## `mlxgen bench reuse` — {result['model']}", "", _load(result), ""]
    for rag in result.get("rag", []):
        if rag is not None:  # None: a run still measuring its first question
            parts += [rag_table(rag), ""]
    if "chat" in result:
        chat = result["chat"]
        parts += [chat_table(chat["typical"], "Chat, typical assistant (system prompt + 5 turns):"),
                  "",
                  chat_table(chat["long_history"],
                             f"Chat on a {chat['history_tokens']}-token history (5 more turns):"),
                  ""]
    return "\n".join(parts)
