"""CPU emulation of our Metal kernels: each kernel body is compiled with g++ against a small shim
of the MSL features it uses (shim/ beside this file) and run over its launch grid, so CI verifies the very
kernel sources a Mac runs. `metal_kernel` mirrors `mx.fast.metal_kernel`."""

from __future__ import annotations

from mlxgen.errors import MlxgenError


class EmulationError(MlxgenError):
    """The emulator could not run a kernel."""


class UnsupportedConstruct(EmulationError):
    """The kernel uses something the shim does not model; it is refused, not emulated."""


class KernelCompileError(EmulationError):
    """g++ rejected the kernel for a reason other than an unmodeled construct."""


class KernelFault(EmulationError):
    """The kernel misbehaved at run time: out-of-bounds access, divergent barrier or collective."""


from .kernel import EmulatedKernel, metal_kernel  # noqa: E402

__all__ = ["EmulatedKernel", "EmulationError", "KernelCompileError", "KernelFault",
           "UnsupportedConstruct", "metal_kernel"]
