"""The kernel signature MLX generates for `mx.fast.metal_kernel`, rebuilt from the same inputs.

MLX only takes the kernel *body* and writes the function around it with these rules (checked
against the format strings in libmlx 0.32.4), which `metal_source` reproduces and `cpp_params`
translates for the emulator:

- `template <typename T, int N, bool B>` from the call's `template=` pairs, in order
  (an mx.Dtype gives `typename`, an int `int`, a bool `bool`).
- Each input `x`, in order, is one buffer: `const device T* x` (`const constant T* x` when the
  array has fewer than 8 elements; `const constant T& x` when it is 0-d). Right after it, only
  if the body contains the substring `x_shape` / `x_strides` / `x_ndim` (and x is not 0-d):
  `const constant int* x_shape`, `const constant int64_t* x_strides`, `const constant int& x_ndim`.
- Each output `y`: `device T* y` (`device atomic<T>* y` with atomic_outputs=True).
- Then one `[[attribute]]` parameter for every name in METAL_ATTRIBUTES that occurs as a
  substring of the body (so `dispatch_threads_per_threadgroup` also brings
  `threads_per_threadgroup`), in that table's order.
- Buffer indices count inputs, their shape/strides/ndim and outputs in declaration order.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# Every attribute MLX can bind, in MLX's order, with the type it declares.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
QUAD_ATTRIBUTES = frozenset(a for a, _ in METAL_ATTRIBUTES if "quadgroup" in a)
# Attributes a kernel may use on a grid that is not a multiple of its threadgroup.
GRID_ONLY_ATTRIBUTES = frozenset({"thread_position_in_grid", "threads_per_grid", "grid_size", "grid_origin"})

TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
    mx.bool_: "bool",
}
MAX_CONSTANT_ARRAY_SIZE = 8


def type_name(dtype: mx.Dtype) -> str:
    from . import UnsupportedConstruct

    if dtype not in TYPE_NAMES:
        raise UnsupportedConstruct(f"arrays of dtype {dtype} are not modeled by the emulator")
    return TYPE_NAMES[dtype]


@dataclass(frozen=True)
class InputParam:
    name: str
    dtype: mx.Dtype
    ndim: int
    size: int
    shape: bool  # body references name_shape (and ndim > 0)
    strides: bool
    ndim_ref: bool


@dataclass(frozen=True)
class Signature:
    name: str
    template: tuple[tuple[str, object], ...]
    inputs: tuple[InputParam, ...]
    outputs: tuple[tuple[str, mx.Dtype], ...]
    attributes: tuple[tuple[str, str], ...]
    atomic_outputs: bool = False

    @property
    def attribute_names(self) -> set[str]:
        return {a for a, _ in self.attributes}


def build_signature(name, input_names, inputs, output_names, output_dtypes, template, source,
                    atomic_outputs=False) -> Signature:
    """Apply MLX's rules to this call (arrays, dtypes, template args) and body text."""
    params = []
    for n, a in zip(input_names, inputs):
        has = a.ndim > 0
        params.append(InputParam(n, a.dtype, a.ndim, a.size, has and f"{n}_shape" in source,
                                 has and f"{n}_strides" in source, has and f"{n}_ndim" in source))
    attrs = tuple((a, t) for a, t in METAL_ATTRIBUTES if a in source)
    return Signature(name, tuple(template or ()), tuple(params),
                     tuple(zip(output_names, output_dtypes)), attrs, atomic_outputs)


def template_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return type_name(value)


def _template_kind(value) -> str:
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "typename"


def template_prefix(sig: Signature) -> str:
    if not sig.template:
        return ""
    return "template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in sig.template) + ">\n"


def metal_source(sig: Signature, source: str, header: str = "") -> str:
    """The Metal source MLX compiles for this call (kernel host name aside)."""
    lines, index = [], 0
    for p in sig.inputs:
        where = "constant" if p.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if p.ndim == 0 else "*"
        lines.append(f"  const {where} {type_name(p.dtype)}{ref} {p.name} [[buffer({index})]]")
        index += 1
        for flag, decl in ((p.shape, "const constant int* {}_shape"),
                           (p.strides, "const constant int64_t* {}_strides"),
                           (p.ndim_ref, "const constant int& {}_ndim")):
            if flag:
                lines.append(f"  {decl.format(p.name)} [[buffer({index})]]")
                index += 1
    for n, dt in sig.outputs:
        t = f"atomic<{type_name(dt)}>" if sig.atomic_outputs else type_name(dt)
        lines.append(f"  device {t}* {n} [[buffer({index})]]")
        index += 1
    lines += [f"  {t} {a} [[{a}]]" for a, t in sig.attributes]
    return (header + template_prefix(sig) + f"[[kernel]] void custom_kernel_{sig.name}(\n"
            + ",\n".join(lines) + ") {\n" + source + "\n}\n")


def cpp_params(sig: Signature) -> tuple[list[str], list[str]]:
    """The emulator's C++ parameter list and the matching call arguments.

    Buffers arrive as `void** b` (same order and indices as MLX's buffers) with element counts
    `n`; attributes come from the fiber's `thread_attrs a`."""
    params, args, index = [], [], 0

    def buffer(ctype: str, pname: str, const: bool = True) -> None:
        nonlocal index
        c = "const " if const else ""
        params.append(f"::mlxgen_emu::ptr<{c}{ctype}> {pname}")
        args.append(f"::mlxgen_emu::ptr<{c}{ctype}>(static_cast<{c}{ctype}*>(b[{index}]), "
                    f"n[{index}], 0, \"{pname}\")")
        index += 1

    def reference(ctype: str, pname: str) -> None:
        nonlocal index
        params.append(f"const {ctype}& {pname}")
        args.append(f"*static_cast<const {ctype}*>(b[{index}])")
        index += 1

    for p in sig.inputs:
        if p.ndim == 0:
            reference(type_name(p.dtype), p.name)
            continue
        buffer(type_name(p.dtype), p.name)
        if p.shape:
            buffer("int", f"{p.name}_shape")
        if p.strides:
            buffer("int64_t", f"{p.name}_strides")
        if p.ndim_ref:
            reference("int", f"{p.name}_ndim")
    for n, dt in sig.outputs:
        buffer(type_name(dt), n, const=False)
    for a, t in sig.attributes:
        params.append(f"{t} {a}")
        args.append(f"a.{a}")
    return params, args
