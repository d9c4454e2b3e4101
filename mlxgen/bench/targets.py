"""Benchmark targets: the common interface and the two in-process ones (mlxgen, mlx-lm).

In-process TTFT is the wall time from the generate call to its first yielded token, with the
model already loaded and warmed up; the load is timed separately (`load_s`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .prompts import Prompt


class TargetError(Exception):
    """A failed request. `fatal`: retrying cannot help (endpoint down, unknown model)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


@dataclass
class Measurement:
    ttft_s: float
    server_prompt_tokens: int | None = None
    server_prefill_s: float | None = None
    server_load_s: float | None = None
    cached_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Target:
    name: str = "target"
    kind: str = "?"
    load_s: float | None = None  # model load, excluded from every TTFT
    load_note: str = ""

    def setup(self) -> None:
        """Connect / prepare; raise TargetError if the target cannot run at all."""

    def run(self, prompt: Prompt, max_tokens: int = 1) -> Measurement:
        raise NotImplementedError

    def cold(self, prompt: Prompt, max_tokens: int = 1) -> float | None:
        """Seconds from nothing loaded to the first token (load + prefill), or None when this
        target has no cold start to measure."""
        return None

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "load_s": self.load_s, "load_note": self.load_note}

    def close(self) -> None:
        pass


class MlxgenTarget(Target):
    kind = "in-process"

    def __init__(self, model, tokenizer, chunk_size: int | None = None, name: str | None = None,
                 load_s: float | None = None, load_args: dict | None = None):
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.name = name or ("mlxgen" if chunk_size is None else f"mlxgen[chunk={chunk_size}]")
        self.load_s = load_s
        self.load_note = "mlxgen.load() wall time"
        self.load_args = load_args  # load(**load_args) again in a fresh process, for cold()

    def cold(self, prompt: Prompt, max_tokens: int = 1) -> float | None:
        """A fresh Python process: import mlxgen, load, prefill, first token; timed from the
        spawn to the child's report of its first token."""
        if self.load_args is None:
            return None
        import json
        import os
        import subprocess
        import sys
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[2])  # this tree's mlxgen, not an installed one
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        job = json.dumps({"load": self.load_args, "ids": prompt.ids, "max_tokens": max_tokens,
                          "chunk": self.chunk_size})
        start = time.time()  # wall clock: the child stamps its first token with it
        child = subprocess.Popen([sys.executable, "-c", _COLD_CHILD], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = child.communicate(job, timeout=900)
        except subprocess.TimeoutExpired:
            child.kill()
            raise TargetError("cold start took over 900 s") from None
        lines = out.splitlines()
        if child.returncode != 0 or not lines or not lines[0].startswith("first "):
            raise TargetError(f"cold start failed: {err.strip().splitlines()[-1:] or out!r}")
        return float(lines[0].split()[1]) - start

    def run(self, prompt: Prompt, max_tokens: int = 1) -> Measurement:
        from ..generate import stream_generate

        start = time.perf_counter()
        gen = stream_generate(self.model, self.tokenizer, prompt.ids, max_tokens=max_tokens,
                              prefill_chunk_size=self.chunk_size)
        response = next(gen)
        ttft = time.perf_counter() - start
        gen.close()
        stats = response.stats
        return Measurement(ttft, cached_tokens=stats.cached_tokens,
                           extra={"internal_ttft_s": stats.ttft_s})

    def info(self) -> dict[str, Any]:
        from ..prefill import chunk_size_for

        rt = self.model.runtime
        return {**super().info(), "prefill_chunk_size": chunk_size_for(self.model, self.chunk_size),
                "backend": rt.backend, "cache_mode": rt.cache_mode,
                # mlx-lm's stream_generate wires the same recommended working set on Metal
                "wired_limit": "recommended working set" if rt.wired_limit else None}


_COLD_CHILD = """
import json, sys, time
job = json.loads(sys.stdin.read())
import mlxgen
from mlxgen.generate import stream_generate
model, tokenizer = mlxgen.load(**job["load"])
gen = stream_generate(model, tokenizer, job["ids"], max_tokens=job["max_tokens"],
                      prefill_chunk_size=job["chunk"])
next(gen)
print("first", time.time(), flush=True)
gen.close()
"""


class MlxLmTarget(Target):
    """mlx-lm's own model code and generate loop on the weights mlxgen loaded (mlx-lm cannot
    read GGUF; sharing the loaded arrays also guarantees the same values and dtype)."""

    kind = "in-process"

    def __init__(self, model, tokenizer, name: str = "mlx-lm"):
        self.source_model, self.source_tokenizer, self.name = model, tokenizer, name
        self.load_note = "mlx-lm model built from mlxgen's loaded weights"

    def setup(self) -> None:
        start = time.perf_counter()
        try:
            self.model = mlx_lm_model(self.source_model)
            self.tokenizer = mlx_lm_tokenizer(self.source_tokenizer)
        except TargetError:
            raise
        except Exception as e:  # an architecture mlx-lm lacks, a renamed field, ...
            raise TargetError(f"cannot build the mlx-lm model: {e}", fatal=True) from None
        self.load_s = time.perf_counter() - start

    def run(self, prompt: Prompt, max_tokens: int = 1) -> Measurement:
        from mlx_lm.generate import stream_generate

        start = time.perf_counter()
        gen = stream_generate(self.model, self.tokenizer, mx.array(prompt.ids), max_tokens=max_tokens)
        response = next(gen)
        ttft = time.perf_counter() - start
        gen.close()
        return Measurement(ttft, extra={"internal_prompt_tps": response.prompt_tps})

    def info(self) -> dict[str, Any]:
        import mlx_lm

        return {**super().info(), "version": mlx_lm.__version__,
                "wired_limit": "recommended working set" if mx.metal.is_available() else None}


def mlx_lm_config(args) -> dict[str, Any]:
    """mlxgen's ModelArgs as an HF-style config dict for mlx-lm's ModelArgs.from_dict."""
    if args.rope_freq_factors is not None:
        raise TargetError(
            "the model uses explicit RoPE frequency factors (GGUF rope_freqs) that mlx-lm's "
            "model code cannot take", fatal=True)
    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    config.pop("rope_freq_factors", None)
    return config


def mlx_lm_model(model, dequantize: bool = False) -> nn.Module:
    """mlx-lm's model class holding our weights. dequantize=True gives it the same values as float
    matrices: an oracle that runs on BLAS instead of MLX's slow CPU quantized matmul (tests)."""
    from mlx_lm.utils import _get_classes

    config = mlx_lm_config(model.args)
    model_class, args_class = _get_classes(config)
    target = model_class(args_class.from_dict(config))
    # Same tensors, mlx-lm's names: only the stacked experts differ.
    weights = {
        k.replace(".mlp.experts.", ".mlp.switch_mlp."): v
        for k, v in tree_flatten(model.parameters())
    }
    ours = {p.replace(".mlp.experts.", ".mlp.switch_mlp."): m for p, m in model.named_modules()}

    def quantized_like_ours(path: str, module: nn.Module):
        src = ours.get(path)
        if f"{path}.scales" not in weights or src is None:
            return False
        return {"group_size": src.group_size, "bits": src.bits}

    if dequantize:
        weights = _dequantized(weights, ours)
    elif any(k.endswith(".scales") for k in weights):  # quantized kept: quantize the same way
        nn.quantize(target, class_predicate=quantized_like_ours)
    if hasattr(target, "sanitize"):
        weights = target.sanitize(weights)
    target.load_weights(list(weights.items()), strict=True)
    target.eval()
    mx.eval(target.parameters())
    return target


def _dequantized(weights: dict[str, mx.array], modules: dict[str, nn.Module]) -> dict[str, mx.array]:
    out = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    # The model's compute dtype (the CPU backend may keep scales narrower than it).
    dtype = next(v.dtype for k, v in out.items() if k.endswith("norm.weight"))
    for key in list(out):
        path = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and f"{path}.scales" in weights:
            m = modules[path]
            scales, biases = weights[f"{path}.scales"], weights.get(f"{path}.biases")
            out[key] = mx.dequantize(out[key], scales.astype(dtype),
                                     None if biases is None else biases.astype(dtype),
                                     group_size=m.group_size, bits=m.bits)
    return out


def mlx_lm_tokenizer(tokenizer):
    """mlx-lm wants a TokenizerWrapper around a transformers tokenizer: wrap our backend."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return TokenizerWrapper(hf, eos_token_ids=sorted(tokenizer.eos_token_ids))
