"""What the emulator refuses, and the two rewrites it applies to kernel text before g++.

Refusing is the point: a construct the shim does not model must fail loudly, never run with
made-up semantics. Three layers: a denylist of known MSL features (checked before compiling),
the shim declaring nothing else (so g++ rejects the rest), and compiler errors mapped back to
"kernel uses X, which the emulation shim does not model"."""

from __future__ import annotations

import re

from . import UnsupportedConstruct

# (pattern, why) for MSL features the shim deliberately does not model.
DENYLIST: tuple[tuple[str, str], ...] = (
    (r"\batomic\w*", "atomics (atomic<T>, atomic_* functions)"),
    (r"\bsimd_prefix_\w+", "simdgroup prefix scans"),
    (r"\bsimd_shuffle_(rotate|and_fill)_\w+", "rotating/filling simdgroup shuffles"),
    (r"\bsimd_(ballot|vote|active_threads_mask|is_first|is_helper_thread|and|or|xor)\b",
     "simdgroup ballots, votes, masks and bitwise reductions"),
    (r"\bquad_\w+|\bquadgroup\w*|\bthread_index_in_quadgroup\b|\bdispatch_quadgroups\w*",
     "quad-groups"),
    (r"\bsimdgroup_(matrix|load|store|multiply\w*|float8x8|half8x8|bfloat8x8)\b"
     r"|\bmake_filled_simdgroup_matrix\b", "simdgroup matrices"),
    (r"\btexture\w*|\bsampler\b|\bimageblock\w*|\bmem_texture\b", "textures, samplers, imageblocks"),
    (r"\bas_type\s*<|\breinterpret_cast\b", "bit reinterpretation (as_type, reinterpret_cast)"),
    (r"\bpacked_\w+", "packed vector types"),
    (r"\bfunction_constant\b", "function constants"),
    (r"#\s*include\s*(?!<metal_stdlib>|<metal_math>|<metal_simdgroup>)", "#include of other files"),
    (r"\(\s*(?:const\s+)?(?:device|constant|threadgroup|thread)\s+[\w:<>,\s]*\*\s*\)",
     "casts to address-space pointers"),
    (r"\b\d+(?:\.\d*)?h\b", "half literals (1.0h)"),
    (r"\b(?:float|half|int|uint|short|ushort|char|uchar|bool)\d(?:x\d)\b", "matrix types"),
    (r"\.(?:[xyzw]{2,4})\b", "vector swizzles"),
)

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_TG_DECL = re.compile(
    r"\bthreadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+([A-Za-z_]\w*)\s*"
    r"((?:\[[^\]]+\]\s*)*);")
_PTR_DECL = re.compile(
    r"\b(const\s+)?(?:device|constant)\s+(const\s+)?([A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)"
    r"\s*\*\s*(?:const\s+)?(?=[A-Za-z_])")


def strip_comments(text: str) -> str:
    """Comments become blanks (newlines kept) so line numbers in errors stay the body's."""
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def refuse_unmodeled(text: str, what: str) -> None:
    code = strip_comments(text)
    for pattern, why in DENYLIST:
        m = re.search(pattern, code)
        if m:
            line = code.count("\n", 0, m.start()) + 1
            raise UnsupportedConstruct(
                f"{what} line {line} uses `{m.group(0).strip()}`: {why} are not modeled by the "
                "emulation shim (tools/metal_emulator/shim/), so this kernel cannot be verified on the CPU.")


def rewrite(text: str) -> str:
    """Threadgroup arrays -> one static, poisoned, bounds-checked object per declaration;
    device/constant pointer declarations -> bounds-checked `ptr<T>`."""
    def tg(m: re.Match) -> str:
        ctype, name, dims = m.group(1), m.group(2), re.findall(r"\[([^\]]+)\]", m.group(3))
        decl = (f"::mlxgen_emu::tg_array<{ctype}, " + ", ".join(f"({d})" for d in dims) + ">"
                if dims else ctype)
        return (f"static {decl} {name}; static const bool {name}__mlxgen_tg = "
                f"::mlxgen_emu::register_tg(&{name}, sizeof({name}));")

    def ptr(m: re.Match) -> str:
        const = "const " if (m.group(1) or m.group(2)) else ""
        return f"::mlxgen_emu::ptr<{const}{m.group(3)}> "

    text = re.sub(r"#\s*include\s*<metal_\w+>", "", text)
    return _PTR_DECL.sub(ptr, _TG_DECL.sub(tg, text))


_COMPILER_ERRORS = (
    (r"error: '([^']+)' was not declared in this scope", "`{}`"),
    (r"error: '([^']+)' is not a member of '(metal[\w:]*)'", "`{1}::{0}`"),
    (r"error: '([^']+)' does not name a type", "the type `{}`"),
    (r"error: [^\n]*has no member named '([^']+)'", "the member or swizzle `.{}`"),
    (r"error: (?:cannot convert|invalid cast)[^\n]*'mlxgen_emu::ptr<", "a raw pointer to a device buffer"),
)


def explain_compile_error(stderr: str) -> str | None:
    """Map g++'s first complaint about an unknown name to a refusal message, if it is one."""
    for pattern, what in _COMPILER_ERRORS:
        m = re.search(pattern, stderr)
        if m:
            return ("kernel uses " + what.format(*m.groups()) + ", which the emulation shim "
                    "(tools/metal_emulator/shim/) does not model (or the kernel does not declare).")
    return None
