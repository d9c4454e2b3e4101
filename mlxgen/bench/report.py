"""Reports of a TTFT run: the markdown table, the JSON record and the log-log plot."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MlxgenError
from .stats import Row, Sample, prefill_flops


@dataclass
class BenchResult:
    config: Any  # ttft.BenchConfig
    samples: list[Sample]
    rows: list[Row]
    targets: list[dict[str, Any]]
    failures: dict[str, str]  # target -> why it was dropped
    model: dict[str, Any]
    peak_gflops: float | None
    env: dict[str, Any] = field(default_factory=dict)
    cold: dict[str, dict[int, float]] = field(default_factory=dict)  # target -> length -> s

    def table(self) -> str:
        return markdown_table(self.rows, self.peak_gflops, self.cold)

    def markdown(self) -> str:
        peak = f"{self.peak_gflops:.1f} GFLOP/s" if self.peak_gflops else "not measured"
        parts = [f"TTFT, model `{self.model.get('source')}` ({self.model.get('parameters')}), "
                 f"backend {self.env.get('backend', {}).get('name', '?')}, float32 matmul peak "
                 f"{peak} (best of the sweep); (!) = server prompt count > 2% off ours.", "", self.table(), "",
                 loads_table(self.targets)]
        if self.cold:
            parts[1:1] = ["cold TTFT: one run from nothing loaded to the first token (mlxgen: a "
                          "fresh process, import + load + prefill; Ollama: after unloading the "
                          "model)."]
        if self.failures:
            parts += ["", "Failures:"] + [f"- {k}: {v}" for k, v in self.failures.items()]
        return "\n".join(parts)

    def record(self) -> dict[str, Any]:
        return _finite({
            "schema": "mlxgen.bench.ttft/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": asdict(self.config), **self.env, "model": self.model,
            "matmul_peak_gflops": self.peak_gflops, "flops_formula": prefill_flops.__doc__,
            "targets": self.targets, "failures": self.failures, "cold_ttft_s": self.cold,
            "summary": [asdict(r) for r in self.rows], "samples": [asdict(s) for s in self.samples],
        })

    def save_json(self, path: str) -> None:
        write_json(path, self.record())

    def plot(self, path: str) -> None:
        plot(self.rows, path, f"TTFT, {Path(str(self.model.get('source'))).name}")


def _ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x * 1e3:.1f}"


def markdown_table(rows: list[Row], peak_gflops: float | None = None,
                   cold: dict[str, dict[int, float]] | None = None) -> str:
    """One line per (prompt length, target); `!` marks a server count > 2% off ours. With cold
    starts measured, a column of them (nothing loaded -> first token, one run)."""
    head = ["target", "prompt tok", "server tok", "TTFT median ms", "TTFT p90 ms", "runs",
            "prefill tok/s", "server prefill ms", "GFLOP/s", "% of matmul peak"]
    if cold:
        head.insert(5, "cold TTFT ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        server = "-" if r.server_prompt_tokens is None else str(r.server_prompt_tokens)
        if r.mismatch:
            server += " (!)"
        ok = r.n > 0
        cells = [
            r.target, str(r.prompt_tokens), server, _ms(r.median_s if ok else None),
            _ms(r.p90_s if ok else None), f"{r.n}" + (f" ({r.failed} failed)" if r.failed else ""),
            f"{r.prompt_tokens / r.median_s:.0f}" if ok and r.median_s > 0 else "-",
            _ms(r.server_prefill_s),
            f"{r.gflops:.1f}" if r.gflops is not None else "-",
            f"{100 * r.gflops / peak_gflops:.0f}%" if r.gflops is not None and peak_gflops else "-",
        ]
        if cold:
            cells.insert(5, _ms(cold.get(r.target, {}).get(r.length)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loads_table(targets: list[dict]) -> str:
    lines = ["| target | model load s | how |", "|---|---|---|"]
    for t in targets:
        load = "-" if t.get("load_s") is None else f"{t['load_s']:.2f}"
        lines.append(f"| {t['name']} | {load} | {t.get('load_note', '')} |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1, default=_jsonable))


def _jsonable(x: Any) -> Any:
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else str(x)


def _finite(x: Any) -> Any:
    """NaN (a cell with no successful run) -> null: strict JSON has no NaN."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MlxgenError(
            "--plot needs matplotlib, which is not installed: pip install 'mlxgen[bench]'"
        ) from None


def plot(rows: list[Row], path: str | os.PathLike, title: str = "") -> None:
    """Median TTFT against prompt length per target, log-log, p90 as the upper error bar."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, notebooks executed headless)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in dict.fromkeys(r.target for r in rows):
        pts = sorted((r.prompt_tokens, r.median_s, r.p90_s) for r in rows
                     if r.target == target and r.n > 0)
        if not pts:
            continue
        x, med, hi = zip(*pts)
        ax.errorbar(x, med, yerr=[[0] * len(x), [h - m for h, m in zip(hi, med)]],
                    marker="o", capsize=3, label=target)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r.prompt_tokens for r in rows if r.n > 0})
    ax.set_xticks(lengths, [str(n) for n in lengths])  # plain token counts, not 2^k
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    seconds = ticker.FuncFormatter(lambda y, _: f"{y:g}")  # label minor ticks too: short ranges
    ax.yaxis.set_major_formatter(seconds)
    ax.yaxis.set_minor_formatter(seconds)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (s), median; bar to p90")
    ax.set_title(title or "TTFT vs prompt length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "?"


def environment() -> dict[str, Any]:
    """Machine, backend and library versions, for the JSON record."""
    import importlib.metadata as md

    import mlx.core as mx

    from .. import __version__
    from ..backends import device
    from ..backends.cpu.blas import blas_in_use

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "machine": {
            "platform": platform.platform(), "arch": platform.machine(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "memory_gb": memory_gb, "python": platform.python_version(),
        },
        "backend": {
            "name": device.backend_name(), "device": str(mx.default_device()),
            "cpu_blas": blas_in_use() if device.is_cpu() else None,
        },
        "versions": {
            "mlxgen": __version__, "mlx": version("mlx"), "mlx-lm": version("mlx-lm"),
            "tokenizers": version("tokenizers"), "transformers": version("transformers"),
        },
    }
