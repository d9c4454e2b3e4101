"""Turn (signature, header, body) into a C++ translation unit, compile it with g++ once, cache
the shared object by content hash under <cache>/kernels-emu, and load it with ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from mlxgen import settings
from . import KernelCompileError, UnsupportedConstruct
from .scan import explain_compile_error, rewrite
from .signature import GRID_ONLY_ATTRIBUTES, Signature, cpp_params, template_prefix, template_value

SHIM_DIR = Path(__file__).resolve().parent / "shim"
SHIM_FILES = ("emu_types.hpp", "emu_runtime.hpp", "metal_shim.hpp")
CXX_FLAGS = ("-std=c++20", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-w",
             "-fno-strict-aliasing", "-fno-fast-math")


def compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelCompileError(f"the kernel emulator needs a C++20 compiler; `{cxx}` was not "
                                 "found (install g++ or set CXX).")
    return path


@cache
def _compiler_id(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True).stdout.split("\n")[0]


def shim_text() -> str:
    # Inlined (not #included) so the cache hash covers the shim, and "#include" lines of the
    # shim files resolve to the text already pasted above them.
    parts = []
    for name in SHIM_FILES:
        text = (SHIM_DIR / name).read_text(encoding="utf-8")
        parts.append("\n".join(l for l in text.splitlines() if not l.startswith('#include "')))
    return "\n".join(parts)


def uses_threadgroup_features(sig: Signature, code: str) -> bool:
    """Kernels that need uniform threadgroups (grid a multiple of the threadgroup) to be modeled."""
    if sig.attribute_names - GRID_ONLY_ATTRIBUTES:
        return True
    return any(w in code for w in ("threadgroup", "simd_", "simdgroup_barrier"))


def translation_unit(sig: Signature, source: str, header: str) -> str:
    params, args = cpp_params(sig)
    fname = f"custom_kernel_{sig.name}"
    targs = ", ".join(template_value(v) for _, v in sig.template)
    call = f"{fname}<{targs}>" if sig.template else fname
    uniform = "true" if uses_threadgroup_features(sig, header + source) else "false"
    return "\n".join([
        shim_text(),
        '#line 1 "header"', rewrite(header),
        template_prefix(sig) + f"void {fname}(" + ",\n    ".join(params) + ") {",
        f'#line 1 "{sig.name}"', rewrite(source),
        "}",
        '#line 1 "mlxgen-emulator"',
        "namespace {",
        "void mlxgen_thread(const ::mlxgen_emu::thread_attrs& a, void* u) {",
        "  auto** bn = static_cast<void**>(u);",
        "  void** b = static_cast<void**>(bn[0]);",
        "  const int64_t* n = static_cast<const int64_t*>(bn[1]);",
        f"  {call}(" + ",\n      ".join(args) + ");",
        "}",
        "}  // namespace",
        'extern "C" __attribute__((visibility("default"))) int mlxgen_emu_run(',
        "    void** b, const int64_t* n, const unsigned* grid, const unsigned* tg, char* err, int errlen) {",
        "  void* bn[2] = {b, const_cast<int64_t*>(n)};",
        f"  return ::mlxgen_emu::launch(grid, tg, {uniform}, &mlxgen_thread, bn, err, errlen);",
        "}",
    ]) + "\n"


def cache_dir() -> Path:
    return settings.cache_dir() / "kernels-emu"


_LOADED: dict[str, ctypes.CDLL] = {}


def load(tu: str, label: str):
    """Compile (or reuse) the translation unit; returns its `mlxgen_emu_run` function."""
    cxx = compiler()
    digest = hashlib.sha256("\0".join([tu, _compiler_id(cxx), *CXX_FLAGS]).encode()).hexdigest()[:24]
    if digest not in _LOADED:
        out = cache_dir() / f"{label}-{digest}.so"
        if not out.exists():
            _compile(cxx, tu, out)
        _LOADED[digest] = ctypes.CDLL(str(out), mode=os.RTLD_LOCAL)
    fn = _LOADED[digest].mlxgen_emu_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                   ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                   ctypes.c_char_p, ctypes.c_int]
    return fn


def _compile(cxx: str, tu: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
        src.write_text(tu)
        env = dict(os.environ, LC_ALL="C", LANG="C")  # ASCII quotes in diagnostics
        proc = subprocess.run([cxx, *CXX_FLAGS, "-o", str(so), str(src)], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            refusal = explain_compile_error(proc.stderr)
            if refusal:
                raise UnsupportedConstruct(refusal + "\n" + _first_error(proc.stderr))
            raise KernelCompileError("g++ rejected the emulated kernel:\n" + _first_error(proc.stderr))
        shutil.copy(src, out.with_suffix(".cpp"))  # kept next to the .so for debugging
        os.replace(so, out)  # atomic: a concurrent run sees the whole file or none


def _first_error(stderr: str, lines: int = 30) -> str:
    out = stderr.splitlines()
    start = next((i for i, l in enumerate(out) if "error" in l), 0)
    return "\n".join(out[max(0, start - 2): start + lines])
