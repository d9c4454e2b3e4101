"""MLXGEN_* validation, dtype/quantization policy, and the BLAS start-up hook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgen import backends, settings
from mlxgen.backends import cpu as cpu_backend
from mlxgen.backends import device
from mlxgen.errors import ConfigError


@pytest.mark.parametrize(
    "name,value",
    [
        ("MLXGEN_PREFILL_CHUNK_SIZE", "0"), ("MLXGEN_PREFILL_CHUNK_SIZE", "-4"),
        ("MLXGEN_PREFILL_CHUNK_SIZE", "12.5"), ("MLXGEN_PREFILL_CHUNK_SIZE", "lots"),
        ("MLXGEN_QUANTIZED", "maybe"), ("MLXGEN_DTYPE", "int8"), ("MLXGEN_LOG_LEVEL", "loud"),
    ],
)
def test_malformed_env_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        settings.validate_all()


def test_env_values_are_used(monkeypatch):
    monkeypatch.setenv("MLXGEN_PREFILL_CHUNK_SIZE", " 128 ")
    assert settings.prefill_chunk_size() == 128
    assert settings.prefill_chunk_size(64) == 64  # an argument wins over the environment
    monkeypatch.setenv("MLXGEN_DTYPE", "bfloat16")
    assert str(device.weight_dtype()) == "mlx.core.bfloat16"
    monkeypatch.setenv("MLXGEN_QUANTIZED", "dequantize")
    assert backends.keep_quantized() is False
    assert backends.keep_quantized("keep") is True  # an argument wins


def test_cpu_policy_defaults(monkeypatch):
    for name in ("MLXGEN_DTYPE", "MLXGEN_QUANTIZED"):
        monkeypatch.delenv(name, raising=False)
    if not device.is_cpu():
        pytest.skip("CPU policy only")
    assert str(device.weight_dtype()) == "mlx.core.float32"
    # Quantized weights stay packed where mlxgen's CPU kernels multiply them, else float32.
    assert backends.keep_quantized() is cpu_backend.quantized_kernels()
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "off")
    assert backends.keep_quantized() is False
    with pytest.raises(ConfigError, match="argument"):
        backends.keep_quantized("sometimes")


def test_cpu_cache_limit_is_raised_but_never_lowered():
    if not device.is_cpu():
        pytest.skip("CPU policy only")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxgen.loading import build_model, model_from_config

    original = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        cpu_backend.raise_cache_limit()
        assert mx.set_cache_limit(cpu_backend.CPU_CACHE_LIMIT * 4) == cpu_backend.CPU_CACHE_LIMIT
        cpu_backend.raise_cache_limit()  # a larger limit set by the user stays
        assert mx.set_cache_limit(32 << 20) == cpu_backend.CPU_CACHE_LIMIT * 4
        # Building any model applies it (load() goes through build_model).
        config = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        weights = dict(tree_flatten(model_from_config(config).parameters()))
        build_model(config, weights)
        assert mx.set_cache_limit(original) == cpu_backend.CPU_CACHE_LIMIT
    finally:
        mx.set_cache_limit(original)


def test_cli_reports_bad_env_cleanly():
    env = dict(os.environ, MLXGEN_PREFILL_CHUNK_SIZE="zero")
    proc = subprocess.run(
        [sys.executable, "-m", "mlxgen.cli", "info", "--model", "/nonexistent"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "MLXGEN_PREFILL_CHUNK_SIZE" in proc.stderr and "Traceback" not in proc.stderr


PROBE = """
import json, sys
{first}
import mlxgen, _mlxgen_blas
from mlxgen.backends.cpu.blas import blas_in_use
maps = open('/proc/self/maps').read()
print(json.dumps({{"status": _mlxgen_blas.status, "mapped": 'libopenblas' in maps,
                  "blas": blas_in_use()}}))
"""


def run_probe(first: str, **env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)], capture_output=True, text=True,
        env=dict(os.environ, **env), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def openblas_available() -> bool:
    import _mlxgen_blas

    return sys.platform.startswith("linux") and _mlxgen_blas.find_blas() is not None


needs_openblas = pytest.mark.skipif(
    not openblas_available(), reason="needs Linux with libopenblas0-pthread installed"
)


@needs_openblas
@pytest.mark.parametrize("first", ["import mlx.core", "pass"])
def test_openblas_loaded_before_mlx_whatever_the_import_order(first):
    # The .pth hook installed with the package loads OpenBLAS before libmlx binds its BLAS.
    out = run_probe(first)
    assert out["mapped"] and out["status"]["before_mlx"], out
    assert out["blas"].startswith("OpenBLAS")


@needs_openblas
def test_blas_opt_out():
    out = run_probe("import mlx.core", MLXGEN_BLAS="off")
    assert not out["mapped"] and out["status"]["loaded"] is None
    assert out["blas"].startswith("reference BLAS")


def test_readme_documents_every_env_var():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in settings.ENV_VARS if f"`{name}`" not in readme]
    assert not missing, f"README's environment table lacks {missing}"


CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 26\nflags\t\t: fpu sse2 avx2 fma {flags}\n\nprocessor\t: 1\n"
ZEN5 = CPUINFO.format(vendor="AuthenticAMD", flags="avx512f avx512cd avx512bw avx512dq avx512vl")


@pytest.mark.parametrize(
    "cpuinfo, environ, want",
    [
        (ZEN5, {}, "SKYLAKEX"),  # AMD with AVX-512: OpenBLAS 0.3.21 would pick AVX2 kernels
        (ZEN5, {"OPENBLAS_CORETYPE": "Haswell"}, None),  # the user's choice stands
        (CPUINFO.format(vendor="AuthenticAMD", flags="avx512f avx512cd"), {}, None),  # partial AVX-512
        (CPUINFO.format(vendor="AuthenticAMD", flags=""), {}, None),  # Zen 3: AVX2 only
        (CPUINFO.format(vendor="GenuineIntel", flags="avx512f avx512cd avx512bw avx512dq avx512vl"),
         {}, "SKYLAKEX"),  # a Xeon newer than OpenBLAS 0.3.21 got its SSE3 kernels otherwise
        (CPUINFO.format(vendor="GenuineIntel", flags=""), {}, None),  # AVX2 Intel: OpenBLAS knows it
        ("", {}, None),  # no /proc/cpuinfo
    ],
)
def test_openblas_coretype_choice(cpuinfo, environ, want):
    import _mlxgen_blas

    assert _mlxgen_blas.coretype_for(cpuinfo, environ) == want


@needs_openblas
def test_openblas_kernels_follow_the_coretype_and_do_not_leak():
    import _mlxgen_blas

    pinned = run_probe("import mlx.core", OPENBLAS_CORETYPE="Haswell")
    assert pinned["status"]["core"] == "Haswell" and pinned["status"]["coretype_set"] is None
    assert "Haswell kernels" in pinned["blas"]
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(first="import os")
         + "print(json.dumps(os.environ.get('OPENBLAS_CORETYPE')))"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    auto, leaked = json.loads(lines[-2]), json.loads(lines[-1])
    want = _mlxgen_blas.coretype_for(_mlxgen_blas._cpuinfo(), env)
    assert auto["status"]["coretype_set"] == want and leaked is None
    if want == "SKYLAKEX":
        assert auto["status"]["core"] == "SkylakeX"
