"""The package's import graph: no circles (function-level imports included) and no upward import
(a lower layer importing a higher one). Importing a submodule also runs its parents' __init__,
so those edges count too (except a module's own ancestors, and the root package, the public
facade)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlxgen"

# Lowest first. A module's layer is that of the longest matching prefix; same layer is allowed.
LAYERS = [
    ("mlxgen.errors", "mlxgen.settings", "mlxgen.runtime", "mlxgen.trust", "mlxgen.jsonfile",
     "mlxgen.sampling"),
    ("mlxgen.cache", "mlxgen.tokenizer", "mlxgen.backends.device", "mlxgen.backends.sources",
     "mlxgen.backends.swap", "mlxgen.backends.cpu.blas", "mlxgen.backends.cpu.ext"),
    ("mlxgen.models",),
    ("mlxgen.backends",),  # cpu/ and metal/ swap their layers into the models
    ("mlxgen.prefill",),
    ("mlxgen.reuse",),  # chunk store, composition, placement, recompute: used by generate
    ("mlxgen.generate",),
    ("mlxgen.reuse.session",),  # multi-turn policy on top of generate
    ("mlxgen.loading",),
    ("mlxgen.info", "mlxgen.bench", "mlxgen.server", "mlxgen.cli", "mlxgen.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mlxgen module `name` imports, anywhere in the file, with their parent packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t.startswith("mlxgen.") and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("mlxgen."):
                parts = t.split(".")
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # A module's own ancestors are already importing when it runs: not edges of its own.
    return {m for m in found if not (name == m or name.startswith(m + "."))}


def layer(name: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} is in no layer of {__file__}: add it"
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items() if n != "mlxgen"}


def test_no_upward_import(graph):
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in graph.items() for b in deps if b in graph and layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if m in graph and not state.get(m):
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if not state.get(n):
            visit(n)


def test_the_checker_sees_a_circle_and_an_upward_import():
    # The checks above can fail: a made-up graph with both faults is caught.
    g = {"mlxgen.cache": {"mlxgen.generate"}, "mlxgen.generate": {"mlxgen.cache"}}
    assert layer("mlxgen.cache") < layer("mlxgen.generate")
    with pytest.raises(AssertionError, match=r"cache \(layer 1\) imports mlxgen.generate"):
        test_no_upward_import(g)
    with pytest.raises(pytest.fail.Exception, match="circle"):
        test_no_import_circle(g)


def test_models_never_ask_where_they_run(graph):
    # Models are plain MLX: the backend is chosen once, at load, by mlxgen.backends.
    for name, deps in graph.items():
        if name.startswith("mlxgen.models"):
            assert not any(d.startswith("mlxgen.backends") for d in deps), (name, deps)


# Imported on first use, not by `import mlxgen`, nor by loading and running a Llama-family model
# on the CPU: K/V reuse, the Metal backend, the other model families, PyPI fetching, and
# everything above the public API.
LAZY = ("mlxgen.reuse", "mlxgen.backends.metal", "mlxgen.models.gemma", "mlxgen.models.qwen3_moe",
        "mlxgen.loading.pypi", "mlxgen.server", "mlxgen.bench", "mlxgen.cli", "mlxgen.info")
# ... and, for `import mlxgen` alone, the CPU backend, Hugging Face reading, and stdlib modules
# only a build, a download or a chat template needs.
LAZY_AT_IMPORT = LAZY + ("mlxgen.backends.cpu", "mlxgen.loading.hf", "subprocess", "tempfile",
                         "platform", "secrets", "datetime", "zipfile")

LIGHT_CHILD = """
import sys, mlxgen
def loaded(names):
    return sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names))
print(loaded({heavy!r} + {lazy_at_import!r}))
model, tok = mlxgen.load(sys.argv[1])
text = mlxgen.generate(model, tok, "Hello", max_tokens=3)
cpu = mlxgen.backends.device.is_cpu()
print(loaded({lazy!r} if cpu else ()))
# The public names are all still there (imported now, on first use).
import mlxgen.reuse, mlxgen.reuse.session
assert mlxgen.Chunk is mlxgen.reuse.Chunk and mlxgen.ChunkStore is mlxgen.reuse.ChunkStore
assert mlxgen.Session is mlxgen.reuse.session.Session
ns = {{}}
exec("from mlxgen import *", ns)
assert set(mlxgen.__all__) <= set(ns) and set(mlxgen.__all__) <= set(dir(mlxgen)), mlxgen.__all__
print("ok", cpu)
"""


def test_import_mlxgen_stays_light(tmp_path):
    """`import mlxgen` is part of every fresh process's wait (a cached load needs no numpy, no
    gguf, no tqdm or jinja2, no module it does not run): they are imported where they are used.
    Loading a tiny Llama and generating on the CPU imports none of LAZY either."""
    import os
    import subprocess
    import sys

    from mlxgen.bench.tiny import write_tiny_llama

    write_tiny_llama(tmp_path / "tiny", layers=1, vocab_size=300)
    heavy = ("numpy", "gguf", "tqdm", "jinja2", "transformers", "torch")
    code = LIGHT_CHILD.format(heavy=heavy, lazy_at_import=LAZY_AT_IMPORT, lazy=LAZY)
    # Kernels off: the same modules are imported, and an empty kernel cache is never built here.
    env = dict(os.environ, MLXGEN_CPU_KERNELS="off")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tiny")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    at_import, after_generate, ok = out.stdout.strip().splitlines()[-3:]
    assert at_import == "[]", at_import
    assert after_generate == "[]", after_generate
    assert ok.startswith("ok"), out.stdout
