"""`metal_kernel(...)`: a CPU stand-in for `mx.fast.metal_kernel` with the same constructor and
call signature, running the kernel body through the g++-compiled shim."""

from __future__ import annotations

import ctypes
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import EmulationError, KernelFault, UnsupportedConstruct
from .build import load, translation_unit
from .scan import refuse_unmodeled
from .signature import QUAD_ATTRIBUTES, build_signature, metal_source, type_name

_STORAGE = {mx.bfloat16: mx.uint16}  # numpy has no bfloat16: move its bits as uint16


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype in _STORAGE:
        a = a.view(_STORAGE[a.dtype])
    return np.ascontiguousarray(np.array(a))  # row-contiguous, as ensure_row_contiguous=True


def _from_numpy(buf: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(buf)
    return out.view(dtype) if dtype in _STORAGE else out


def _as_array(x) -> mx.array:
    # MLX accepts Python scalars as inputs: bool -> bool_, int -> int32, float -> float32.
    return x if isinstance(x, mx.array) else mx.array(x)


class EmulatedKernel:
    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 source: str, header: str = "", ensure_row_contiguous: bool = True,
                 atomic_outputs: bool = False):
        if atomic_outputs:
            raise UnsupportedConstruct("atomic_outputs=True (device atomic<T>* outputs) is not "
                                       "modeled by the emulator.")
        if not output_names:
            raise EmulationError("a kernel needs at least one output (as in MLX).")
        refuse_unmodeled(header, "kernel header")
        refuse_unmodeled(source, f"kernel `{name}`")
        used = [a for a in QUAD_ATTRIBUTES if a in source]
        if used:
            raise UnsupportedConstruct(f"kernel `{name}` uses `{used[0]}`: quad-groups are not modeled.")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        # The emulator always hands the body row-contiguous buffers (with matching strides);
        # with ensure_row_contiguous=False MLX may pass strided ones, so such kernels must read
        # `x_strides`, which the emulator fills in truthfully for what it passes.
        self.ensure_row_contiguous = ensure_row_contiguous

    def signature(self, inputs, template, output_dtypes):
        return build_signature(self.name, self.input_names, inputs, self.output_names,
                               output_dtypes, template, self.source)

    def metal_source(self, inputs, template=(), output_dtypes=()) -> str:
        """The Metal source MLX would generate for this call (what verbose=True prints on a Mac)."""
        inputs = [_as_array(x) for x in inputs]
        return metal_source(self.signature(inputs, template, output_dtypes), self.source, self.header)

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes, template=None,
                 init_value: float | None = None, verbose: bool = False, stream=None):
        inputs = [_as_array(x) for x in inputs]
        if len(inputs) != len(self.input_names):
            raise EmulationError(f"kernel `{self.name}` expects {len(self.input_names)} inputs, "
                                 f"got {len(inputs)}.")
        if not (len(output_shapes) == len(output_dtypes) == len(self.output_names)):
            raise EmulationError("output_shapes and output_dtypes must match output_names.")
        sig = self.signature(inputs, template, output_dtypes)
        if verbose:
            print(metal_source(sig, self.source, self.header))
        run = load(translation_unit(sig, self.source, self.header), self.name)

        buffers: list[np.ndarray] = []
        for p, a in zip(sig.inputs, inputs):
            buffers.append(_to_numpy(a))
            if p.shape:
                buffers.append(np.array(a.shape, dtype=np.int32))
            if p.strides:
                buffers.append(np.array(_row_strides(a.shape), dtype=np.int64))
            if p.ndim_ref:
                buffers.append(np.array([a.ndim], dtype=np.int32))
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            type_name(dtype)  # refuses unmodeled dtypes
            if init_value is None:
                out = _to_numpy(mx.zeros(tuple(shape), dtype))
                out.view(np.uint8)[...] = 0xFF  # poison: NaN for floats, all-ones for integers
            else:
                out = _to_numpy(mx.full(tuple(shape), init_value, dtype))
            outputs.append(out)
        buffers += outputs

        ptrs = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        counts = (ctypes.c_int64 * len(buffers))(*[b.size for b in buffers])
        g = (ctypes.c_uint * 3)(*grid)
        t = (ctypes.c_uint * 3)(*threadgroup)
        err = ctypes.create_string_buffer(4096)
        if run(ptrs, counts, g, t, err, len(err)) != 0:
            raise KernelFault(f"kernel `{self.name}`: {err.value.decode(errors='replace')}")
        return [_from_numpy(o, dt) for o, dt in zip(outputs, output_dtypes)]


def _row_strides(shape) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False) -> EmulatedKernel:
    """Drop-in for `mx.fast.metal_kernel` that runs on the CPU (see mlxgen/emulation)."""
    return EmulatedKernel(name, input_names, output_names, source, header,
                          ensure_row_contiguous, atomic_outputs)
