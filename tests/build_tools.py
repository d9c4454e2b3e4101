"""Skip markers for tests that build native code: mlxgen's CPU kernels (cmake, a C++ compiler,
nanobind: Linux's `cpu` extra, absent on a Mac) and the Metal kernel emulator (g++)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest


def missing_cpu_kernel_tools() -> str | None:
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if importlib.util.find_spec("nanobind") is None:
        missing.append("nanobind")
    return f"the CPU kernels need {', '.join(missing)} (the `cpu` extra)" if missing else None


needs_cpu_kernel_tools = pytest.mark.skipif(missing_cpu_kernel_tools() is not None,
                                            reason=str(missing_cpu_kernel_tools()))
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="the Metal kernel emulator needs g++ (C++20)")
