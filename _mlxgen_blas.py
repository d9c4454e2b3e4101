"""Load an optimized BLAS into the global symbol scope before MLX's CPU library loads.

MLX's Linux CPU wheel links a reference BLAS (~5 GFLOP/s matmul). If libopenblas is already in
the global scope when libmlx loads, the dynamic linker binds MLX's BLAS calls to it (~30x faster).
`mlxgen_blas.pth` installs `install_hook()` at interpreter start-up, so this works whatever the
import order; it costs nothing until something imports `mlx`. Opt out with MLXGEN_BLAS=off, or
point MLXGEN_BLAS at a specific library file. Kept stdlib-only: it runs in every interpreter."""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for mlxgen.backend to report: path loaded, or the reason nothing was.
status: dict = {"loaded": None, "reason": "hook not run", "before_mlx": False}


def find_blas() -> str | None:
    setting = os.environ.get("MLXGEN_BLAS", "auto").strip()
    if setting.lower() in ("off", "0", "false", "no", "none"):
        return None
    if setting.lower() not in ("auto", ""):
        return setting
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def load_blas() -> str | None:
    """Load the BLAS now (idempotent); returns the path loaded, or None."""
    if status["loaded"] or not sys.platform.startswith("linux"):
        return status["loaded"]
    path = find_blas()
    if path is None:
        status["reason"] = "disabled by MLXGEN_BLAS" if os.environ.get("MLXGEN_BLAS") else "not found"
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        status["reason"] = f"failed to load {path}: {e}"
        return None
    status["loaded"] = path
    status["before_mlx"] = "mlx.core" not in sys.modules
    status["reason"] = ""
    return path


class _BeforeMlx:
    """Meta-path finder that loads the BLAS the first time `mlx` is imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx" or name.startswith("mlx."):
            self.remove()
            load_blas()
        return None  # let the normal finders import the module

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install_hook() -> None:
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return
    if not any(isinstance(f, _BeforeMlx) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMlx())
