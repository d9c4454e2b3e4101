"""`kernels="auto" | "off" | "on"` (or MLXGEN_KERNELS), and whether this process can run them."""

from __future__ import annotations

import mlx.core as mx

from ... import settings
from ...errors import ConfigError

MODES = ("auto", "off", "on")
ENV = "MLXGEN_KERNELS"


def resolve_mode(kernels: str | None = None) -> str:
    """The argument wins over the environment; anything but auto/off/on is a ConfigError."""
    if kernels is not None:
        if kernels not in MODES:
            raise ConfigError(f"kernels must be one of {', '.join(MODES)}; got {kernels!r}.")
        return kernels
    return settings.choice(ENV, None, MODES, "auto")


def unavailable_reason() -> str | None:
    """None when custom Metal kernels can run here, else why not."""
    if not mx.metal.is_available():
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and cuda.is_available():
            return ("this MLX runs on CUDA; mlxgen's kernels are Metal sources "
                    "(mx.fast.metal_kernel) and have no CUDA twins yet")
        return "this MLX has no Metal backend (custom kernels need a Metal GPU: Apple silicon)"
    if mx.default_device() != mx.gpu:
        return "the default device is the CPU (custom kernels run only on the Metal GPU)"
    return None


def require_available(mode_source: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(
            f"{mode_source} forces custom kernels, but {reason}. Use 'auto' (the MLX "
            "composition mx.fast.rope + scaled_dot_product_attention is used where kernels "
            "cannot run) or 'off'.")
