"""Per-stream sampling: mlx-lm's logits filters, drawn with this stream's own random key.

mlx-lm's make_sampler draws from MLX's global random state, so two seeded streams interleaved in
one thread disturb each other, and a sampling failure can leave the global state unusable for
the rest of the process. Here every stream owns a key (from its seed, or drawn once from the
global state when unseeded) and splits it per token; the global state is never left mid-graph."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import mlx.core as mx


def _mlx_lm_sample_utils() -> ModuleType:
    """mlx_lm.sample_utils (math and mlx.core only) without running mlx_lm's package __init__,
    which imports its converter and transformers: seconds of every cold start otherwise."""
    if "mlx_lm.sample_utils" in sys.modules:
        return sys.modules["mlx_lm.sample_utils"]
    try:
        package = importlib.util.find_spec("mlx_lm")
        spec = importlib.util.spec_from_file_location(
            "mlx_lm.sample_utils", f"{package.submodule_search_locations[0]}/sample_utils.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError, AttributeError, TypeError):  # its layout changed: import it whole
        import mlx_lm.sample_utils as module
    sys.modules["mlx_lm.sample_utils"] = module  # what `import mlx_lm` will then reuse
    return module


sample_utils = _mlx_lm_sample_utils()
apply_min_p, apply_top_k, apply_top_p = (sample_utils.apply_min_p, sample_utils.apply_top_k,
                                         sample_utils.apply_top_p)


def stream_key(seed: int | None) -> mx.array:
    """The seeded key, or one drawn (and evaluated at once) from MLX's global random state, so
    mx.random.seed(...) still makes unseeded generation reproducible."""
    if seed is None:
        seed = mx.random.randint(0, 2**31 - 1, ()).item()
        mx.eval(mx.random.state)
    return mx.random.key(seed)


class StreamSampler:
    """sampler(logprobs) -> token ids, as mlx-lm's samplers; temperature 0 is greedy.

    top_k >= the vocabulary size keeps every token, i.e. it is the same as top_k=0 (off)."""

    def __init__(self, temperature: float, top_p: float = 1.0, min_p: float = 0.0,
                 top_k: int = 0, seed: int | None = None):
        self.temperature, self.top_p, self.min_p, self.top_k = temperature, top_p, min_p, top_k
        self.key = stream_key(seed) if temperature > 0 else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.key is None:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if 0 < self.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, self.top_k)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=sub)
