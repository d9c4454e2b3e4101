"""Which BLAS MLX's CPU matmuls bind to (loaded by the start-up hook, _mlxgen_blas.py)."""

from __future__ import annotations

import logging
import sys

import _mlxgen_blas

# If the start-up hook was not installed (e.g. running from a source tree), try now: it still
# works when mlx.core has not been imported yet.
if "mlx.core" not in sys.modules:
    _mlxgen_blas.load_blas()

log = logging.getLogger("mlxgen")


def blas_in_use() -> str:
    """The BLAS MLX's CPU matmuls bind to, from what this process has mapped."""
    status = _mlxgen_blas.status
    if status["loaded"] and status["before_mlx"]:
        core = f", {status['core']} kernels" if status.get("core") else ""
        return f"OpenBLAS ({status['loaded']}{core})"
    if status["loaded"]:
        return "reference BLAS (OpenBLAS was loaded after mlx.core; it has no effect)"
    return f"reference BLAS (OpenBLAS {status['reason']})"


_reported = False


def report_blas() -> None:
    """One log line per process naming the BLAS; a warning when the CPU is stuck on the slow one."""
    global _reported
    if _reported or not sys.platform.startswith("linux"):
        return
    _reported = True
    blas = blas_in_use()
    if blas.startswith("OpenBLAS"):
        log.info("mlxgen: CPU backend, BLAS = %s", blas)
    else:
        log.warning(
            "mlxgen: CPU backend, BLAS = %s; float32 matmul runs ~30x slower. Install "
            "libopenblas0-pthread (apt) and reinstall mlxgen, or import mlxgen before mlx.", blas
        )
