"""Command line: `mlxgen generate`, `mlxgen info`, `mlxgen serve` (server/) and `mlxgen bench ...`
(bench/)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import backends, settings
from .errors import MlxgenError
from .loading.pypi import DEFAULT_MODEL


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="HF directory or repo id, file.gguf, ollama:NAME[:TAG], or a PyPI-shipped model "
        f"(smollm2:135m, qwen2.5-coder:0.5b). Default: {DEFAULT_MODEL}",
    )
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None)
    p.add_argument("--quantized", choices=("auto", "keep", "dequantize"), default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion and print its stats")
    _model_arg(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text prompt (no chat template)")
    src.add_argument("--chat", help="a user message, sent through the model's chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temp", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--repetition-context-size", type=int, default=20)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--prefill-chunk-size", type=int, default=None)
    gen.add_argument("--server", default=None, metavar="URL",
                     help="send the request to a running `mlxgen serve` (or Ollama) at URL "
                     "instead of loading the model here (default: $MLXGEN_SERVER)")

    serve = sub.add_parser("serve", help="an Ollama- and OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=11435)
    serve.add_argument("--models", nargs="*", default=[], metavar="MODEL",
                       help="models to load at start (any source --model takes)")
    serve.add_argument("--max-memory", default=None, metavar="BYTES",
                       help="weights kept loaded (e.g. 8GB); least recently used models are "
                       "unloaded past it. Default: no limit")
    serve.add_argument("--cache-memory", default="1GiB", metavar="BYTES",
                       help="K/V of recent requests kept for prefix reuse (default 1GiB)")
    serve.add_argument("--keep-alive", default="5m",
                       help="how long an idle model stays loaded (Ollama's duration; -1: forever)")
    serve.add_argument("--no-reuse", action="store_true",
                       help="no K/V reuse across requests (each prompt is prefilled whole)")
    serve.add_argument("--log-level", default="info")

    info = sub.add_parser("info", help="describe a model: architecture, size, dtype, tokenizer")
    _model_arg(info)

    bench = sub.add_parser(
        "bench", help="benchmarks: matmul (peak GFLOP/s), ttft, reuse (K/V reuse), kernels (see bench/)"
    )
    bench.add_argument("what", choices=("matmul", "ttft", "reuse", "kernels"))
    # `bench ttft` owns its options (mlxgen/bench/ttft.py); everything after it goes there.
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    from . import load, stream_generate
    from .generate import SamplingParams
    from .tokenizer import check_text

    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, stop=args.stop,
    )
    SamplingParams(**sampling)  # bad options fail before the model is loaded
    for flag in ("prompt", "chat", "system"):
        if getattr(args, flag) is not None:  # invalid UTF-8 in argv arrives as lone surrogates
            check_text(getattr(args, flag), f"--{flag}")
    if args.prefill_chunk_size is not None:
        settings.prefill_chunk_size(args.prefill_chunk_size)
    url = args.server or settings.server_url()
    if url:
        from .server.client import generate_remote

        generate_remote(url, args.model, args.prompt, args.chat, args.system, sampling)
        return
    model, tokenizer = load(args.model, dtype=args.dtype, quantized=args.quantized, progress=True)
    if args.chat is not None:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
    else:
        prompt = args.prompt
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, prefill_chunk_size=args.prefill_chunk_size, **sampling
    ):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print(f"[{response.finish_reason}] {response.stats.summary()}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from .errors import ConfigError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MlxgenError("mlxgen serve needs starlette and uvicorn: pip install "
                          "'mlxgen[serve]'.") from None
    from .server.app import ServerConfig, serve
    from .server.pool import parse_keep_alive

    def size(value: str | None, flag: str) -> int | None:
        try:
            return None if value is None else settings.chunk_store_bytes(value)
        except ConfigError:
            raise ConfigError(f"{flag} must be a byte count such as 8GB or 512MiB; got "
                              f"{value!r}.") from None

    try:
        keep_alive = parse_keep_alive(args.keep_alive)
    except ConfigError as e:
        raise ConfigError(f"--keep-alive: {e}") from None
    if not 0 < args.port < 65536:
        raise MlxgenError(f"--port must be in 1..65535; got {args.port}.")
    config = ServerConfig(
        models=tuple(args.models), max_memory=size(args.max_memory, "--max-memory"),
        cache_memory=size(args.cache_memory, "--cache-memory"),
        keep_alive=keep_alive, reuse=not args.no_reuse)
    serve(args.host, args.port, config, args.log_level)


def cmd_info(args: argparse.Namespace) -> None:
    from .info import describe
    from . import load

    model, tokenizer = load(args.model, dtype=args.dtype, quantized=args.quantized, progress=True)
    for key, value in describe(model, tokenizer).items():
        print(f"{key:>22}: {value}")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "reuse":
        from .bench.reuse import run_cli as run_reuse

        if run_reuse(args.bench_args):
            raise SystemExit(2)
        return
    if args.what == "kernels":
        from .backends.metal import main as run_kernels

        if run_kernels(args.bench_args):
            raise SystemExit(1)
        return
    if args.what == "ttft":
        from .bench.ttft import run_cli

        code = run_cli(args.bench_args)
        if code:
            raise SystemExit(code)
        return
    if args.bench_args:
        raise MlxgenError(f"bench matmul takes no options; got {' '.join(args.bench_args)}.")
    from .info import matmul_gflops

    print(f"float32 matmul: {matmul_gflops():.1f} GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        logging.basicConfig(level=settings.log_level("INFO"), format="%(message)s")
        backends.check_environment()
        {"generate": cmd_generate, "info": cmd_info, "bench": cmd_bench,
         "serve": cmd_serve}[args.command](args)
    except MlxgenError as e:
        print(f"mlxgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`mlxgen generate ... | head -1`): stop quietly with the status a
        # tool killed by SIGPIPE has, and keep Python from complaining while it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    return 0


if __name__ == "__main__":
    sys.exit(main())
