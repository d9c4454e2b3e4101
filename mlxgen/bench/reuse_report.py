"""Markdown for `mlxgen bench reuse` results (the JSON holds everything, per question too)."""

from __future__ import annotations


def _load(result: dict) -> str:
    a, b = result.get("load_avg_start"), result.get("load_avg_end")
    fmt = lambda x: "/".join(f"{v:.1f}" for v in x) if x else "?"  # noqa: E731
    return (f"{result.get('cpu_count')} CPUs, {result.get('device')}; load average (1/5/15 min) "
            f"{fmt(a)} at start, {fmt(b)} at end (shared machine: timings are noisy)")


def rag_table(rag: dict) -> str:
    lines = [
        f"RAG: {len(rag['questions'])} questions, 4 stored documents of {rag['doc_tokens']} tokens "
        f"(encoded once in {rag['encode_s']:.2f} s), strategy `{rag['strategy']}`; cold TTFT "
        f"(full prefill, median) {rag['cold_ttft_s']:.3f} s for "
        f"{rag['questions'][0]['prompt_tokens']}-token prompts.",
        "",
        "| recompute | greedy agreement (mean / min) | identical prefix / compared | mean KL "
        "| first-token KL | TTFT | speedup | cached tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rag["table"]:
        lines.append(
            f"| {r['recompute']:.2f} | {r['agreement']:.1%} / {r['agreement_min']:.1%} | "
            f"{r['prefix']:.1f} / {r.get('n', 32):.1f} | {abs(r['kl']):.4f} | "
            f"{abs(r['kl_first']):.4f} | {r['ttft_s']:.3f} s | "
            f"{r['speedup']:.1f}x | {r['cached_tokens']:.0f} |"
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
    if "rag" in result:
        parts += [rag_table(result["rag"]), ""]
    if "chat" in result:
        chat = result["chat"]
        parts += [chat_table(chat["typical"], "Chat, typical assistant (system prompt + 5 turns):"),
                  "",
                  chat_table(chat["long_history"],
                             f"Chat on a {chat['history_tokens']}-token history (5 more turns):"),
                  ""]
    return "\n".join(parts)
