"""Kernel or composition? "auto" runs a one-time micro-benchmark per (device, op, shape, dtype)
and uses the kernel only if it is measurably faster and agrees with the composition; decisions
persist in <cache>/kernel-decisions.json under the device name and MLX version."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ... import settings
from .launch import Factory
from .mode import ENV, require_available, resolve_mode, unavailable_reason

log = logging.getLogger("mlxgen")

DECISIONS_FILE = "kernel-decisions.json"
WIN_MARGIN = 0.95  # the kernel must take at most 95% of the composition's time
Thunk = Callable[[], object]
Bench = Callable[[Thunk, Thunk], dict]


def device_key() -> str:
    info = mx.device_info()
    return f"{info.get('device_name', 'unknown')}|mlx {mx.__version__}"


def bucket(n: int, floor: int = 1) -> int:
    """Power-of-two bucket, so a decision covers a range of context lengths."""
    return max(floor, 1 << max(0, n - 1).bit_length())


def _time_us(fn: Thunk, iters: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(iters)])
        mx.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def _flatten(x) -> list[mx.array]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref| over all outputs, in float32."""
    worst = 0.0
    for o, r in zip(_flatten(out), _flatten(ref)):
        r32 = r.astype(mx.float32)
        d = mx.abs(o.astype(mx.float32) - r32).max().item()
        worst = max(worst, d / max(mx.abs(r32).max().item(), 1e-30))
    return worst


def microbenchmark(kernel: Thunk, composition: Thunk, iters: int = 20, rounds: int = 5) -> dict:
    """Time both on the same synthetic inputs; refuse a kernel that disagrees with MLX."""
    ref, out = composition(), kernel()  # also warms up (compiles) both
    mx.eval(ref, out)
    err = relative_error(out, ref)
    if not err <= 1e-2:  # catches NaN too
        return {"use_kernel": False, "kernel_us": None, "composition_us": None,
                "note": f"kernel disagrees with the composition (relative error {err:.1e})"}
    t_k, t_c = _time_us(kernel, iters, rounds), _time_us(composition, iters, rounds)
    return {"use_kernel": t_k <= WIN_MARGIN * t_c, "kernel_us": round(t_k, 2),
            "composition_us": round(t_c, 2), "note": ""}


class KernelDispatch:
    """Decides, per op and shape, between a custom kernel and the MLX composition.

    `available`, `factory`, `device`, `bench` and `path` are injectable for tests (e.g. the
    emulator as factory on a CPU); by default they describe this process's real backend."""

    def __init__(self, kernels: str | None = None, *, path: Path | None = None,
                 available: bool | None = None, factory: Factory | None = None,
                 device: str | None = None, bench: Bench | None = None):
        self.mode = resolve_mode(kernels)
        self.mode_source = f"kernels={kernels!r}" if kernels is not None else f"{ENV}=on"
        self.reason = unavailable_reason() if available is None else (
            None if available else "kernels were declared unavailable")
        if self.mode == "on" and available is None:
            require_available(self.mode_source)
        self.factory = factory or mx.fast.metal_kernel
        self.path = path or settings.cache_dir() / DECISIONS_FILE
        self.device = device or device_key()
        self.bench = bench or microbenchmark
        self._decisions: dict[str, dict] | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.reason is None

    def choose(self, op: str, shape_key: str, kernel: Thunk, composition: Thunk,
               measure: bool = True) -> bool:
        """True to use the kernel. The thunks run the op on the same synthetic inputs of this
        shape, made before either is timed. With measure=False (a decode step) an undecided
        shape takes the composition: nothing is ever timed in the middle of generation."""
        if not self.enabled:
            return False
        if self.mode == "on":
            return True
        decisions = self._load()
        key = f"{op}|{shape_key}"
        if key not in decisions:
            if not measure:
                return False
            decisions[key] = self.bench(kernel, composition)
            log.info("mlxgen kernels: %s on %s -> %s (%s)", key, self.device,
                     "kernel" if decisions[key]["use_kernel"] else "composition", decisions[key])
            self._save()
        return bool(decisions[key]["use_kernel"])

    def decisions(self) -> dict[str, dict]:
        return dict(self._load())

    def _load(self) -> dict[str, dict]:
        if self._decisions is None:
            self._decisions = self._read().get(self.device, {})
        return self._decisions

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        data = self._read()  # merge: other devices/MLX versions share the file
        data[self.device] = self._decisions
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache only costs re-benchmarking next run
            log.warning("mlxgen kernels: could not save decisions to %s: %s", self.path, e)


_DEFAULT: dict[str, KernelDispatch] = {}


def get_dispatch(kernels: str | None = None) -> KernelDispatch:
    """The process-wide dispatcher for this mode (argument, else MLXGEN_KERNELS)."""
    mode = resolve_mode(kernels)
    if mode not in _DEFAULT:
        _DEFAULT[mode] = KernelDispatch(mode if kernels is not None else None)
    return _DEFAULT[mode]
