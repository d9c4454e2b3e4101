"""Load an optimized BLAS into the global symbol scope before MLX's CPU library loads.

MLX's Linux CPU wheel links a reference BLAS (~5 GFLOP/s matmul). If libopenblas is already in
the global scope when libmlx loads, the dynamic linker binds MLX's BLAS calls to it (~30x faster).
`mlxgen_blas.pth` installs `install_hook()` at interpreter start-up, so this works whatever the
import order; it costs nothing until something imports `mlx`. Opt out with MLXGEN_BLAS=off, or
point MLXGEN_BLAS at a specific library file. Kept stdlib-only: it runs in every interpreter.

OpenBLAS picks its kernels per CPU when it loads; releases older than the CPU (Debian 12 ships
0.3.21) run AMD Zen 4/5 on their AVX2 (Haswell) kernels and a new Intel Xeon on SSE3 (Prescott)
ones. On an x86 CPU with AVX-512, unless OPENBLAS_CORETYPE is already set, it is set to SKYLAKEX
for the load (the AVX-512 kernels newer OpenBLAS picks there itself; bench/NOTES.md)."""

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

# What happened, for mlxgen.backend to report: path loaded, or the reason nothing was; and the
# kernels OpenBLAS chose ("core"), with the OPENBLAS_CORETYPE mlxgen set, if any.
status: dict = {"loaded": None, "reason": "hook not run", "before_mlx": False, "core": None,
                "coretype_set": None}

# What OpenBLAS's SkylakeX kernels need (AVX-512 Foundation, CD, BW, DQ, VL).
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def coretype_for(cpuinfo: str, environ=os.environ) -> str | None:
    """The OPENBLAS_CORETYPE to load OpenBLAS with, from /proc/cpuinfo's text: SKYLAKEX on an
    x86 CPU with AVX-512 (AMD or Intel: an OpenBLAS older than the CPU falls back to older
    kernels, down to SSE3 "Prescott" on a new Xeon), None otherwise or when the user set
    OPENBLAS_CORETYPE."""
    if environ.get("OPENBLAS_CORETYPE"):
        return None
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if "vendor_id" in fields and "flags" in fields:  # the first CPU's entries suffice
            break
    x86 = fields.get("vendor_id") in ("AuthenticAMD", "GenuineIntel")
    return "SKYLAKEX" if x86 and AVX512 <= set(fields.get("flags", "").split()) else None


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


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
    coretype = coretype_for(_cpuinfo())
    if coretype:  # read by OpenBLAS while it loads; not left behind for child processes
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        status["reason"] = f"failed to load {path}: {e}"
        return None
    finally:
        if coretype:
            del os.environ["OPENBLAS_CORETYPE"]
    status["coretype_set"] = coretype
    corename = getattr(lib, "openblas_get_corename", None)  # absent from other BLAS libraries
    if corename is not None:
        corename.restype = ctypes.c_char_p
        status["core"] = (corename() or b"").decode() or None
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
