"""The suite as a Mac sees it, simulated here: another platform (sys.platform "darwin") without
the CPU kernels' build tools (no cmake, C++ compiler or nanobind: Linux's `cpu` extra) and with
an empty kernel cache. The whole suite must collect without errors, and the platform-sensitive
files must run with skips that say why and no failures (the rest of the suite is the same code
on the same CPU, run by the main job)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SENSITIVE = ["tests/test_cpu_kernels.py", "tests/test_cpu_fast_path.py", "tests/test_settings_backend.py",
             "tests/test_kernel_emulation.py", "tests/test_kernel_shim.py", "tests/test_kernel_wiring.py",
             "tests/test_kernel_dispatch.py", "tests/test_import_graph.py", "tests/test_cache_modes.py"]


def simulated(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLXGEN_TEST_SIMULATE="darwin", MLXGEN_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_whole_suite_collects(tmp_path):
    proc = simulated(["--collect-only", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\d+ tests? collected in", proc.stdout, re.M), proc.stdout[-2000:]


def test_platform_sensitive_files_pass_or_skip_with_reasons(tmp_path):
    proc = simulated(["-q", "-rs", "-m", "not slow", *SENSITIVE], tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    assert " failed" not in out and " error" not in out
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    reasons = " ".join(skips)
    # What a Mac lacks is named: the CPU kernel tools, g++ for the emulator, OpenBLAS (Linux).
    assert "the `cpu` extra" in reasons and "g++" in reasons and "Linux" in reasons, reasons
    assert re.search(r"\d+ passed", out)
