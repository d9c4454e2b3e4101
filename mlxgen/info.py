"""Descriptions and quick measurements of a loaded model and the machine."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .backends import device
from .backends.cpu.blas import blas_in_use


def describe(model: nn.Module, tokenizer) -> dict[str, str]:
    args = model.args
    params = tree_flatten(model.parameters())
    n_params = sum(v.size for k, v in params if not k.endswith(("scales", "biases")))
    quantized = [type(m).__name__ for _, m in model.named_modules() if "scales" in m]
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for _, v in params})
    info = getattr(model, "info", None)
    return {
        "source": info.source if info else "?",
        "file": info.path if info else "?",
        "format": info.format if info else "?",
        "architecture": args.model_type,
        "layers": str(args.num_hidden_layers),
        "hidden size": str(args.hidden_size),
        "heads (q/kv)": f"{args.num_attention_heads}/{args.num_key_value_heads} x {args.head_dim}",
        "experts": f"{args.num_experts} ({args.num_experts_per_tok} per token)" if args.num_experts else "-",
        "parameters": f"{n_params / 1e6:.1f} M" if n_params < 1e9 else f"{n_params / 1e9:.2f} B",
        "dtype": ", ".join(dtypes),
        "quantized (loaded)": f"{len(quantized)} layers" if quantized else "no (dequantized or float)",
        "quantized (file)": str(info.quantization) if info and info.quantization else "no",
        "context length": str(args.max_position_embeddings),
        "rope": rope_summary(args),
        "sliding window": window_summary(args),
        "vocab": str(tokenizer.vocab_size),
        "chat template": "yes" if tokenizer.chat_template else "no",
        "eos ids": str(sorted(tokenizer.eos_token_ids)),
        "device": device.backend_name(),
        "runs on": _runs_on(model),
        "cpu blas": blas_in_use() if device.is_cpu() else "-",
    }


def rope_summary(args) -> str:
    """RoPE base, scaling type with its factor, partial rotary and Gemma 3's local base."""
    scaling = args.rope_scaling or {}
    text = f"theta={args.rope_theta:g}"
    if scaling:
        text += f", {scaling.get('rope_type')} scaling"
        if scaling.get("factor") is not None:
            text += f" x{scaling['factor']:g}"
        if scaling.get("original_max_position_embeddings"):
            text += f" (original context {scaling['original_max_position_embeddings']})"
    if args.partial_rotary_factor != 1.0:
        text += f", rotary on {args.partial_rotary_factor:g} of each head"
    if args.rope_local_base_freq is not None and args.sliding_window:
        text += f"; sliding layers theta={args.rope_local_base_freq:g}"
    return text


def window_summary(args) -> str:
    """Which layers attend through a sliding window, and its size."""
    windows = args.layer_windows()
    n = sum(w is not None for w in windows)
    if n == 0:
        return "none (every layer sees the whole context)"
    return f"{args.sliding_window} tokens on {n} of {len(windows)} layers"


def _runs_on(model: nn.Module) -> str:
    rt = model.runtime
    ops = {"cpu": "mlxgen CPU ops and kernels", "metal": "MLX ops + Metal kernels where measured faster",
           "mlx": "MLX's own ops"}.get(rt.backend, rt.backend)
    return f"{ops}; prefill chunk {rt.prefill_chunk_size}; default cache {rt.cache_mode}"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Median float32 matmul rate of this backend: the peak prefill can hope for."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9
