"""`mlxgen bench ttft`: time-to-first-token of mlxgen against mlx-lm, Ollama and OpenAI-compatible
servers, under one set of fairness rules:

- the same weights: in-process targets share the arrays mlxgen loaded; servers are pointed at the
  same file (`--model ollama:NAME` loads the GGUF that Ollama serves);
- the same prompt token counts: prompts are cut to exact lengths with the model's tokenizer and
  the server's own count is reported beside ours, flagged when > 2% off;
- a unique beginning for every request, so no prefix cache serves it;
- warm-up runs excluded, model load excluded (reported separately), targets interleaved run by
  run with a rotating order, N repetitions summarized by median and p90;
- an idle pause before every run (`settle_s`): a target's worker threads keep spinning for a
  while after it answers (the reference Ollama's OpenMP threads burn ~0.2 s of CPU), which would
  slow whichever target runs next."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from ..errors import MlxgenError
from . import report
from .prompts import build_prompt
from .report import BenchResult
from .stats import Sample, prefill_flops, schedule, summarize
from .targets import MlxgenTarget, MlxLmTarget, Target, TargetError

DEFAULT_LENGTHS = (128, 512, 1024, 2048)
IN_PROCESS = ("mlxgen", "mlx-lm")


@dataclass
class BenchConfig:
    model: str | None = None  # None: ollama:<ollama_model> when given, else mlxgen's default
    targets: Sequence[str] = IN_PROCESS  # in-process targets to run
    chunk_sizes: Sequence[int] | None = None  # one mlxgen target per size
    ollama: str | None = None
    ollama_model: str | None = None
    openai: Sequence[str] = ()
    openai_model: str | None = None
    lengths: Sequence[int] = DEFAULT_LENGTHS
    reps: int = 5
    warmup: int = 1
    max_tokens: int = 1
    timeout: float = 120.0
    max_failures: int = 3  # consecutive failures before a target is dropped
    dtype: str | None = None
    quantized: str | None = None
    measure_peak: bool = True
    progress: bool = True
    # Measured: a Qwen 128-token prefill right after an Ollama request took 589 ms, 0.5 s later
    # 509 ms, 2 s later 499 ms (bench/NOTES.md).
    settle_s: float = 1.0
    cold: bool = False  # after the warm sweep: one cold start per target and length

    def model_source(self) -> str:
        from ..loading.pypi import DEFAULT_MODEL

        if self.model:
            return self.model
        return f"ollama:{self.ollama_model}" if self.ollama_model else DEFAULT_MODEL


def make_targets(config: BenchConfig, model, tokenizer, load_s: float) -> list[Target]:
    targets: list[Target] = []
    unknown = set(config.targets) - set(IN_PROCESS)
    if unknown:
        raise MlxgenError(f"unknown in-process target(s) {sorted(unknown)}; known: {IN_PROCESS}.")
    if "mlxgen" in config.targets:
        for chunk in config.chunk_sizes or [None]:
            load_args = {"source": config.model_source(), "dtype": config.dtype,
                         "quantized": config.quantized}
            targets.append(MlxgenTarget(model, tokenizer, chunk, load_s=load_s,
                                        load_args=load_args))
    if "mlx-lm" in config.targets:
        targets.append(MlxLmTarget(model, tokenizer))
    if config.ollama:
        from .servers import OllamaTarget

        if not config.ollama_model:
            raise MlxgenError("--ollama needs --ollama-model NAME (the model Ollama serves).")
        num_ctx = max(config.lengths) + config.max_tokens + 64
        targets.append(OllamaTarget(config.ollama, config.ollama_model, num_ctx, config.timeout))
    for url in config.openai:
        from .servers import OpenAITarget

        targets.append(OpenAITarget(url, config.openai_model, config.timeout))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise MlxgenError(f"two targets share a name: {names}; give distinct endpoints/sizes.")
    return targets


def run(config: BenchConfig, log=None) -> BenchResult:
    """Load the model (timed), set every target up, then sweep prompt lengths; a failing target
    is reported and dropped while the others go on. `log` receives progress messages."""
    from tqdm.auto import tqdm

    from .. import load
    from ..info import describe, matmul_gflops
    from .stats import matmul_params

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))  # printed above the bar
    if not config.lengths or config.reps < 1 or config.warmup < 0 or not 0 <= config.settle_s <= 60:
        raise MlxgenError("need at least one prompt length, --reps >= 1, --warmup >= 0 and "
                          "--settle between 0 and 60 seconds.")
    source = config.model_source()
    start = time.perf_counter()
    model, tokenizer = load(source, dtype=config.dtype, quantized=config.quantized)
    load_s = time.perf_counter() - start
    info = describe(model, tokenizer)
    model_info = {"source": source, **{k: info[k] for k in
                  ("file", "format", "architecture", "parameters", "dtype", "quantized (file)")},
                  "matmul_params": matmul_params(model.args), "load_s": load_s}
    targets = make_targets(config, model, tokenizer, load_s)
    failures: dict[str, str] = {}
    live: list[Target] = []
    for t in targets:
        try:
            t.setup()
            live.append(t)
        except TargetError as e:
            failures[t.name] = f"setup failed: {e}"
            log(f"[{t.name}] {failures[t.name]}; continuing without it")
    # The shared VM's speed drifts by 2x within a sweep: the peak is the best of measurements
    # taken before every length and after the last, not one taken at a slow moment.
    peaks = [matmul_gflops()] if config.measure_peak else []
    flops_of = lambda n: prefill_flops(model.args, n)
    samples: list[Sample] = []
    plan = schedule([t.name for t in live], config.reps, config.warmup)
    by_name = {t.name: t for t in live}
    streak = {t.name: 0 for t in live}
    bar = tqdm(total=len(plan) * len(config.lengths), desc="ttft", unit="run",
               disable=not config.progress, file=sys.stderr)
    for i, length in enumerate(sorted(config.lengths)):
        if peaks and i > 0:
            peaks.append(matmul_gflops())
        for name, rep, warm in plan:
            if name in failures:
                bar.update(1)
                continue
            bar.set_postfix_str(f"{name} @ {length} tok" + (" (warm-up)" if warm else ""))
            prompt = build_prompt(tokenizer, length)  # a fresh nonce for every request
            sample = Sample(name, length, rep, False, prompt.tokens, prompt.nonce)
            fatal = False
            time.sleep(config.settle_s)  # let the previous target's threads go idle
            try:
                m = by_name[name].run(prompt, config.max_tokens)
                sample.ok, sample.ttft_s = True, m.ttft_s
                sample.server_prompt_tokens, sample.server_prefill_s = (
                    m.server_prompt_tokens, m.server_prefill_s)
                sample.server_load_s, sample.cached_tokens = m.server_load_s, m.cached_tokens
                sample.extra = m.extra
                streak[name] = 0
            except TargetError as e:
                sample.error, fatal = str(e), e.fatal
            except Exception as e:  # an in-process target crashing must not end the sweep
                sample.error, fatal = f"{type(e).__name__}: {e}", False
            samples.append(sample)
            bar.update(1)
            if not sample.ok:
                streak[name] += 1
                if fatal or streak[name] >= config.max_failures:
                    why = "" if fatal else f" ({streak[name]} failures in a row)"
                    failures[name] = f"dropped at {length} tokens{why}: {sample.error}"
                    log(f"[{name}] {failures[name]}")
    bar.close()
    cold = _cold_starts(config, tokenizer, [t for t in live if t.name not in failures], log)
    for t in live:
        t.close()
    peak = max([*peaks, matmul_gflops()]) if peaks else None
    return BenchResult(config, samples, summarize(samples, flops_of), [t.info() for t in targets],
                       failures, model_info, peak, report.environment(), cold)


def _cold_starts(config: BenchConfig, tokenizer, targets: list[Target], log) -> dict:
    """{target: {length: seconds}}: one cold start (nothing loaded -> first token) per target
    and length, for targets that have one (a fresh mlxgen process; Ollama after an unload)."""
    cold: dict[str, dict[int, float]] = {}
    if not config.cold:
        return cold
    for length in sorted(config.lengths):
        for t in targets:
            time.sleep(config.settle_s)
            try:
                seconds = t.cold(build_prompt(tokenizer, length), config.max_tokens)
            except TargetError as e:
                log(f"[{t.name}] cold start at {length} tokens failed: {e}")
                continue
            if seconds is not None:
                cold.setdefault(t.name, {})[length] = seconds
    return cold


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser(prog: str = "mlxgen bench ttft") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="weights for the in-process targets and the tokenizer: HF dir "
                   "or repo, .gguf, ollama:NAME[:TAG], smollm2, qwen2.5-coder (default: "
                   "ollama:<--ollama-model> if given, else smollm2)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--quantized", choices=("auto", "keep", "dequantize"))
    p.add_argument("--targets", default="mlxgen,mlx-lm",
                   help="in-process targets, comma-separated, or 'none' (default: mlxgen,mlx-lm)")
    p.add_argument("--chunk-sizes", type=_ints, help="mlxgen prefill chunk sizes to sweep")
    p.add_argument("--ollama", metavar="URL", help="an Ollama endpoint, e.g. http://127.0.0.1:11434")
    p.add_argument("--ollama-model", metavar="NAME", help="the model name Ollama serves")
    p.add_argument("--openai", metavar="URL", action="append", default=[],
                   help="an OpenAI-compatible server (/v1/completions); repeatable")
    p.add_argument("--openai-model", metavar="NAME", help="model field sent to --openai servers")
    p.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS),
                   help="prompt lengths in tokens (default: 128,512,1024,2048)")
    p.add_argument("--reps", type=int, default=5, help="measured runs per target and length")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per target and length")
    p.add_argument("--max-tokens", type=int, default=1, help="tokens each request generates")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--max-failures", type=int, default=3,
                   help="consecutive failures before a target is dropped")
    p.add_argument("--json", metavar="PATH", help="write every sample and the environment here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of TTFT vs prompt length")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="idle pause before every run, so the previous target's spinning threads "
                        "do not slow the next one (default: 1.0)")
    p.add_argument("--cold", action="store_true",
                   help="also time one cold start per target and length: a fresh mlxgen process "
                        "(import, load, first token), Ollama after unloading the model")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    targets = [] if args.targets.strip() == "none" else [
        t.strip() for t in args.targets.split(",") if t.strip()]
    return BenchConfig(
        model=args.model, targets=targets, chunk_sizes=args.chunk_sizes, ollama=args.ollama,
        ollama_model=args.ollama_model, openai=args.openai, openai_model=args.openai_model,
        lengths=args.lengths, reps=args.reps, warmup=args.warmup, max_tokens=args.max_tokens,
        timeout=args.timeout, max_failures=args.max_failures, dtype=args.dtype,
        quantized=args.quantized, measure_peak=not args.no_peak, progress=not args.no_progress,
        settle_s=args.settle, cold=args.cold,
    )


def run_cli(argv: Sequence[str] | None = None, prog: str = "mlxgen bench ttft") -> int:
    """Parse, run, print the table; write --json / --plot. Raises MlxgenError on bad input."""
    args = build_parser(prog).parse_args(argv)
    if args.plot:
        report.require_matplotlib()  # fail before minutes of benchmarking, not after
    config = config_from_args(args)
    result = run(config)
    print(result.markdown())
    if args.json:
        result.save_json(args.json)
    if args.plot:
        result.plot(args.plot)
    return 0 if any(s.ok and not s.warmup for s in result.samples) else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_cli(argv, prog="bench/ttft.py")
    except MlxgenError as e:
        print(f"ttft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
