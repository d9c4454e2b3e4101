"""Parse a GGUF file's header: metadata values and the tensor directory, from a memory map.

Every count and size is checked against the bytes left before it is used, so a truncated or
hostile file fails with a clear error before any large allocation. Parsed here because the `gguf`
package's GGUFReader takes ~25 s on a 150k vocabulary."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..errors import ModelLoadError, UnsupportedModelError

_VALUE_DTYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/HF order (GGUF's ne reversed)
    qtype: QT
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    buffer: mmap.mmap = field(repr=False)
    data_start: int = 0  # bytes before the first tensor: metadata and tensor directory


class _Cursor:
    """Reads GGUF values; every count is checked against the bytes left before it is used."""

    MAX_DEPTH = 4  # arrays of arrays: real files nest at most one level

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def u32(self) -> int:
        self.pos += 4
        return struct.unpack_from("<I", self.buf, self.pos - 4)[0]

    def u64(self) -> int:
        self.pos += 8
        return struct.unpack_from("<Q", self.buf, self.pos - 8)[0]

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """n items of at least min_bytes each must fit in the rest of the file."""
        if n * min_bytes > self.left():
            raise ValueError(f"{what} count {n} cannot fit in the {self.left()} bytes left")
        return n

    def string(self) -> str:
        n = self.u64()
        if n > self.left():
            raise EOFError
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """count strings in one tight loop (a vocabulary and its merges: 300k strings)."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = [""] * count
        for i in range(count):
            n = length(buf, pos)[0]
            pos += 8
            if n > end - pos:
                raise EOFError
            out[i] = buf[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= self.MAX_DEPTH:
                raise ValueError(f"arrays nested deeper than {self.MAX_DEPTH} levels")
            etype, count = self.u32(), self.u64()
            if etype in _VALUE_DTYPES:  # numeric arrays in one vectorized read
                dt = np.dtype(_VALUE_DTYPES[etype])
                self.count(count, dt.itemsize, "array")
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            self.count(count, 8 if etype == _STRING else 12, "array")  # a length / type+count
            if etype == _STRING:
                return self.strings(count)
            return [self.value(etype, depth + 1) for _ in range(count)]
        dt = np.dtype(_VALUE_DTYPES[vtype])  # KeyError: unknown value type
        value = np.frombuffer(self.buf, dt, 1, self.pos)[0]
        self.pos += dt.itemsize
        # float32 -> shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)
        return float(str(value)) if vtype == 6 else value.item()


MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse metadata and tensor directory; check the magic and that no tensor data is missing."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}. Check the path (or use ollama:NAME).")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(
                f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'). Pass a "
                ".gguf file from llama.cpp/Ollama, or an HF model directory."
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf)
    cur.pos = 4
    try:
        version = cur.u32()
        if version not in (2, 3):
            raise UnsupportedModelError(
                f"{path}: GGUF version {version} is not supported (need 2 or 3; a huge number "
                "means a big-endian file). Re-convert it with a recent llama.cpp."
            )
        n_tensors, n_kv = cur.u64(), cur.u64()
        cur.count(n_kv, 12, "metadata key")  # key length + value type, at least
        cur.count(n_tensors, 24, "tensor")  # name length + dims count + type + offset
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.u32())
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (GGUF allows 1-{MAX_DIMS})")
            ne = [cur.u64() for _ in range(n_dims)]
            raw_infos.append((name, ne, cur.u32(), cur.u64()))
    except (EOFError, struct.error, ValueError) as e:
        raise ModelLoadError(
            f"{path}: GGUF header is truncated or corrupt ({e or 'unexpected end of file'}). "
            "Re-download the file."
        ) from None
    except KeyError as e:
        raise ModelLoadError(
            f"{path}: GGUF header has unknown value type {e}; the file is corrupt, re-download it."
        ) from None
    align = meta.get("general.alignment", 32)
    if not (isinstance(align, int) and not isinstance(align, bool) and 0 < align <= MAX_ALIGNMENT
            and align & (align - 1) == 0):
        raise ModelLoadError(f"{path}: general.alignment must be a power of two up to "
                             f"{MAX_ALIGNMENT}; got {align!r}. The file is corrupt; re-download it.")
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, ne, type_id, off in raw_infos:
        try:
            qtype = QT(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"{path}: tensor {name} has unknown GGML type id {type_id}; this gguf package is "
                "too old for the file, or the file is corrupt."
            ) from None
        block, type_size = GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not block:
            raise UnsupportedModelError(f"{path}: tensor {name} has GGML type {qtype.name}, which "
                                        "holds no weights mlxgen can read.")
        if not ne or ne[0] % block or min(ne) < 1 or math.prod(ne) * type_size > len(buf) * block:
            raise ModelLoadError(f"{path}: tensor {name} has a corrupt shape {ne} for a file of "
                                 f"{len(buf)} bytes; re-download.")
        nbytes = math.prod(ne) // block * type_size
        tensors.append(TensorInfo(name, tuple(reversed(ne)), qtype, data_start + off, nbytes))
    need = max((t.offset + t.nbytes for t in tensors), default=data_start)
    if need > len(buf):
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {need} bytes but the file has {len(buf)}. "
            "The download or copy was interrupted; fetch the file again (ollama pull NAME)."
        )
    return GGUFHeader(version, meta, tensors, buf, data_start)
