"""Model fingerprints: which model a stored chunk's K/V belong to.

architecture + config + a digest of the weights. Hashing every byte of a model costs about as
much as reading it (0.5 GB for a 135M model in float32), so each parameter contributes its name,
shape, dtype and an evenly strided sample of SAMPLES elements. Tradeoff: two checkpoints that
differ only in weights outside the sample collide (a sparse edit of a few elements could); any
fine-tune, merge, re-quantization or dtype change touches sampled elements and is told apart."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import mlx.core as mx
from mlx.utils import tree_flatten

SAMPLES = 1024  # elements hashed per parameter


def array_bytes(a: mx.array):
    """The raw bytes of an array as a numpy uint8 view (bfloat16 has no numpy dtype)."""
    import numpy as np  # here, not at import: `import mlxgen` (a fresh process's wait) need not pay

    return np.asarray(a.reshape(-1).view(mx.uint8))


def model_fingerprint(model) -> str:
    """A 32-hex-digit digest of the model's architecture, config, (sampled) weights and K/V dtype."""
    h = hashlib.sha256()
    config = dataclasses.asdict(model.args) if dataclasses.is_dataclass(model.args) else model.args
    # The K/V's storage dtype too: chunks encoded through a float16 cache differ in rounding.
    kv_dtype = getattr(getattr(model, "runtime", None), "kv_dtype", None)
    h.update(json.dumps({"model_type": model.model_type, "config": config, "kv_dtype": kv_dtype},
                        sort_keys=True, default=str).encode())
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples = []
    for _, p in params:
        flat = p.reshape(-1)
        samples.append(flat[:: max(1, flat.size // SAMPLES)][:SAMPLES])
    mx.eval(samples)
    for (name, p), sample in zip(params, samples):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(array_bytes(sample))
    return h.hexdigest()[:32]
