"""Metal memory hygiene as mlx-lm practises it: wire the model's memory while generating."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce

log = logging.getLogger("mlxgen")


def model_bytes(model: nn.Module) -> int:
    return tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0)


@contextlib.contextmanager
def wired_limit(model: nn.Module) -> Iterator[None]:
    """Raise the wired limit to the GPU's recommended working set for the duration, so the
    weights are not paged out between steps; restored after. A no-op without a Metal GPU."""
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info().get("max_recommended_working_set_size")
    if limit is None:
        yield
        return
    if model_bytes(model) > 0.9 * limit:
        log.warning("mlxgen: the model needs %d MB, close to the GPU's recommended working set of "
                    "%d MB; generation may be slow.", model_bytes(model) >> 20, limit >> 20)
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)
