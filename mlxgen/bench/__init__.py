"""Benchmarks: `mlxgen bench ttft` (time to first token against mlx-lm, Ollama and
OpenAI-compatible servers) lives in ttft.py; see its docstring for the fairness rules."""

from .prompts import Prompt, build_prompt
from .stats import Row, Sample, prefill_flops, summarize
from .report import BenchResult
from .ttft import BenchConfig, run

__all__ = ["BenchConfig", "BenchResult", "run", "Prompt", "build_prompt", "Row", "Sample",
           "prefill_flops", "summarize"]
