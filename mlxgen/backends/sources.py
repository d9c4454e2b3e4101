"""Kernel sources (kernels/*.metal and the emulation shim) read as package data.

A wheel ships the repo's kernels/ directory as mlxgen/kernels_src (pyproject force-include);
a source checkout or editable install reads kernels/ at the repository root."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

_REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@cache
def read_source(name: str) -> str:
    """Text of kernels/<name> (e.g. "attn_decode.metal", "emu/metal_shim.hpp")."""
    packaged = resources.files("mlxgen").joinpath("kernels_src", *name.split("/"))
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = _REPO_KERNELS / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {name!r} is missing from mlxgen/kernels_src and "
                                f"{_REPO_KERNELS}; reinstall mlxgen.")
    return path.read_text(encoding="utf-8")
