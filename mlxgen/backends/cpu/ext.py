"""mlxgen's C++ CPU kernels (kernels/cpu/fast_math.cpp): built once per machine, loaded as MLX ops.

MLX JIT-compiles its CPU kernels without -march (SSE2, no FMA), splits an exp polynomial into
several passes, composes RMSNorm and RoPE from 5-15 ops, and sends a one-row matmul through a
packing sgemm. These primitives do the softmax numerators, SwiGLU, RMSNorm and RoPE in one pass
each and the LM head's few-row matmul as a streaming dot product on all cores, built for the host
CPU (3-8x faster per op, bench/NOTES.md). The build needs cmake, a C++ compiler, Python headers
and nanobind (dependencies on Linux); it is cached under `<MLXGEN_CACHE_DIR>/cpu-kernels/<hash>`
keyed by the sources, MLX, nanobind, Python and the CPU's feature flags.
When anything is missing the build fails once, is logged, and ops.py keeps its MLX-op forms.

    python -c "from mlxgen.backends.cpu import ext; ext.main()"   # build now (make setup does it)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from ... import settings, trust
from ..sources import read_source

log = logging.getLogger("mlxgen")

SOURCES = ("cpu/fast_math.cpp", "cpu/quant.cpp", "cpu/decode_layer.cpp", "cpu/repack.cpp",
           "cpu/cpu_kernel.h", "cpu/kernels.h",
           "cpu/pool.h", "cpu/CMakeLists.txt")
MODULE = "_mlxgen_cpu"
BUILD_TIMEOUT_S = 600


class CpuKernelBuildError(RuntimeError):
    """The CPU kernels could not be built or loaded; the message names the cause and the log."""


def _cpu_flags() -> str:
    # The build uses -march=native: a cache shared between different CPUs must not mix builds.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor()


def _versions() -> str:
    import platform

    import mlx.core as mx

    try:
        import nanobind

        nb = nanobind.__version__
    except ImportError:
        nb = "missing"
    return f"mlx {mx.__version__}; nanobind {nb}; python {sys.version}; {platform.machine()}; {_cpu_flags()}"


def build_dir() -> Path:
    """Where this machine's build of the current sources lives."""
    h = hashlib.sha256(_versions().encode())
    for name in SOURCES:
        h.update(read_source(name).encode())
    return settings.cache_dir() / "cpu-kernels" / h.hexdigest()[:16]


def _find_built(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{MODULE}*.so")) + sorted(directory.glob(f"{MODULE}*.pyd"))
    return found[0] if found else None


def build() -> Path:
    """Build the extension into build_dir() (a no-op when already built); return the library."""
    out = build_dir()
    if lib := _find_built(out):
        if trust.safe_to_load(lib):
            return lib
        out = _set_aside_untrusted(out, lib)
    import subprocess  # building: once per machine, not part of `import mlxgen`
    import tempfile

    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        raise CpuKernelBuildError("cmake was not found on PATH; install cmake (apt or pip).")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename it into place: concurrent builders never see
    # (or load) a half-written library, and the first finished build wins.
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        (src / Path(name).name).write_text(read_source(name), encoding="utf-8")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [cmake, "-S", str(src), "-B", str(work / "build"), f"-DPython_EXECUTABLE={sys.executable}",
         *generator],
        [cmake, "--build", str(work / "build"), "--parallel", str(os.cpu_count() or 2)],
    ]
    log_path = out.parent / "last-build.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        for step in steps:
            try:
                subprocess.run(step, stdout=log_file, stderr=subprocess.STDOUT, check=True,
                               timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                shutil.rmtree(work, ignore_errors=True)
                raise CpuKernelBuildError(f"building mlxgen's CPU kernels failed ({e}); "
                                          f"see {log_path}.") from None
    lib = _find_built(work / "build")
    if lib is None:
        shutil.rmtree(work, ignore_errors=True)
        raise CpuKernelBuildError(f"the CPU kernel build produced no {MODULE} library; see {log_path}.")
    staged = work / "out"
    staged.mkdir()
    shutil.copy2(lib, staged / lib.name)
    try:
        staged.rename(out)
    except OSError:
        pass  # another process finished first: use its build
    shutil.rmtree(work, ignore_errors=True)
    found = _find_built(out)
    if found is None or not trust.safe_to_load(found):
        raise CpuKernelBuildError(f"the CPU kernel library in {out} is not safe to load: "
                                  f"{trust.untrusted_reason(found or out)}.")
    return found


def _set_aside_untrusted(out: Path, lib: Path) -> Path:
    # Never import a library someone else could have written: move it away and build afresh.
    log.warning("mlxgen: not loading %s (%s); rebuilding the CPU kernels.", lib,
                trust.untrusted_reason(lib))
    try:
        out.rename(out.with_name(f"{out.name}.untrusted-{os.getpid()}"))
    except OSError as e:
        raise CpuKernelBuildError(f"{lib} is not safe to load ({trust.untrusted_reason(lib)}) and "
                                  f"cannot be moved aside ({e}); delete {out}.") from None
    return out


def _import(lib: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_check(module: ModuleType) -> None:
    # Fails if the library cannot take mx.array (a nanobind ABI different from mlx.core's).
    import mlx.core as mx

    x = mx.array([[0.0, -1.0, 2.0]])
    got = module.softmax_numerators(x, 1, -1).tolist()[0]
    want = [float(v) for v in mx.exp(x - 2.0).tolist()[0]]
    if any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
        raise CpuKernelBuildError(f"CPU kernel self-check failed: {got} != {want}.")


@cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        module = _import(build())
        _self_check(module)
        return module, ""
    except Exception as e:  # any failure leaves the MLX-op path in place
        log.warning("mlxgen: CPU kernels unavailable, using MLX ops (slower prefill): %s", e)
        return None, str(e)


def kernels() -> ModuleType | None:
    """The extension (built on first use), or None when MLXGEN_CPU_KERNELS=off or it cannot build."""
    mode = settings.cpu_kernels()
    if mode == "off":
        return None
    module, error = _load()
    if module is None and mode == "on":
        raise CpuKernelBuildError(f"MLXGEN_CPU_KERNELS=on but the CPU kernels are unavailable: {error}")
    return module


def built() -> ModuleType | None:
    """The extension where it is already built for these sources (imported now), else None; never
    starts a build (a GGUF load asks: building belongs to the backend and `make setup`). None
    also when MLXGEN_CPU_KERNELS=off."""
    if settings.cpu_kernels() == "off":
        return None
    lib = _find_built(build_dir())
    if lib is None or not trust.safe_to_load(lib):
        return None
    return _load()[0]


def loaded() -> ModuleType:
    """The extension, for the CPU layers, which are only installed once kernels() found it."""
    module, error = _load()
    if module is None:
        raise CpuKernelBuildError(f"the CPU kernels are not loaded: {error}")
    return module


def main() -> None:
    module, error = _load()
    print(f"mlxgen CPU kernels: {module.__file__}" if module else
          f"mlxgen CPU kernels: not built ({error}); prefill uses MLX ops.")


if __name__ == "__main__":
    main()
