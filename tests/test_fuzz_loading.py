"""A seeded fuzzer for the loaders: GGUF header edits, truncations and metadata type confusion,
and config.json field edits. Every case must end in a loaded model or an mlxgen error, within a
time and memory bound. MLXGEN_FUZZ_CASES (default 300) and MLXGEN_FUZZ_SEED (default 0) scale it:

    MLXGEN_FUZZ_CASES=5000 pytest tests/test_fuzz_loading.py
"""

from __future__ import annotations

import json
import mmap
import os
import random
import resource
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf_fixtures import add_metadata, write_synthetic
from test_loading_hf import LLAMA, hf_weights, reference, write_model

import mlxgen
from mlxgen.errors import MlxgenError
from mlxgen.loading.gguf_header import _Cursor

CASES = int(os.environ.get("MLXGEN_FUZZ_CASES", "300"))
SEED = int(os.environ.get("MLXGEN_FUZZ_SEED", "0"))
CASE_SECONDS = 10.0  # generous for a shared, noisy machine; the bombs found took 6-107 s
CASE_RSS_BYTES = 512 << 20  # growth of the process's peak RSS allowed per case
BOUNDARY = [0, 1, 2, 3, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63,
            2**64 - 1]
ODD_VALUES = ["abc", "", -1, 0, 2**31, 2**40, 10**12, 1e12, 0.5, -0.0, float("inf"),
              float("nan"), True, None, [], [1, 2], {"a": 1}, [[[[]]]], "1e9"]


def peak_rss() -> int:
    scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_case(path: Path, what: str) -> str:
    """Load path; return 'ok' or the error class; fail on anything else or on a bound."""
    before, start = peak_rss(), time.perf_counter()
    try:
        mlxgen.load(path)
        outcome = "ok"
    except MlxgenError as e:
        outcome = type(e).__name__
    except Exception as e:  # noqa: BLE001 - the finding this fuzzer exists for
        pytest.fail(f"{what}: raw {type(e).__name__}: {e}")
    took, grew = time.perf_counter() - start, peak_rss() - before
    assert took < CASE_SECONDS, f"{what}: took {took:.1f} s"
    assert grew < CASE_RSS_BYTES, f"{what}: peak RSS grew by {grew >> 20} MiB"
    return outcome


class _Recorder(_Cursor):
    """A cursor that notes where every integer field of the header is."""

    def __init__(self, buf):
        super().__init__(buf)
        self.fields: list[tuple[int, int]] = []

    def u32(self):
        self.fields.append((self.pos, 4))
        return super().u32()

    def u64(self):
        self.fields.append((self.pos, 8))
        return super().u64()


def header_fields(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, size) of every integer field in the header, and where the header ends."""
    with open(path, "rb") as f:
        cur = _Recorder(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    cur.pos = 4
    cur.u32()
    n_tensors, n_kv = cur.u64(), cur.u64()
    for _ in range(n_kv):
        cur.string()
        cur.value(cur.u32())
    for _ in range(n_tensors):
        cur.string()
        for _ in range(cur.u32()):
            cur.u64()
        cur.u32()
        cur.u64()
    return cur.fields, cur.pos


def metadata_of(syn_path: Path) -> dict:
    from mlxgen.loading.gguf import read_gguf_header

    return read_gguf_header(syn_path).metadata


def rewrite_with_meta(src: Path, dst: Path, meta: dict) -> None:
    """dst = src with its metadata replaced (values written with their Python types)."""
    from gguf import GGUFReader

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, meta.get("general.architecture") or "llama")
    for key, value in meta.items():
        if key in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            continue
        add_metadata(writer, key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def mutate_gguf(rng: random.Random, base: bytes, fields, header_end: int) -> tuple[bytes, str]:
    data = bytearray(base)
    kind = rng.choice(["field", "field", "field", "bytes", "truncate"])
    if kind == "field":
        at, size = rng.choice(fields)
        value = rng.choice(BOUNDARY + [rng.getrandbits(size * 8)]) % (1 << (size * 8))
        data[at:at + size] = value.to_bytes(size, "little")
        return bytes(data), f"field@{at}={value}"
    if kind == "bytes":
        edits = []
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(4, header_end)
            data[at] = rng.randrange(256)
            edits.append(at)
        return bytes(data), f"bytes@{edits}"
    cut = rng.randrange(0, len(data))
    return bytes(data[:cut]), f"truncate@{cut}"


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "base.gguf"
    write_synthetic(path, "llama", layers=2, hidden=32, heads=4, kv_heads=2, ff=64)
    assert run_case(path, "base") == "ok"
    return path


def test_fuzz_gguf_bytes(gguf_base, tmp_path):
    rng = random.Random(SEED)
    base = gguf_base.read_bytes()
    fields, header_end = header_fields(gguf_base)
    outcomes: dict[str, int] = {}
    n = CASES * 2 // 3
    for i in range(n):
        data, what = mutate_gguf(rng, base, fields, header_end)
        path = tmp_path / "case.gguf"
        path.write_bytes(data)
        out = run_case(path, f"gguf case {i} ({what}, seed {SEED})")
        outcomes[out] = outcomes.get(out, 0) + 1
    print(f"\nGGUF byte cases: {n}, outcomes {outcomes}")
    assert sum(v for k, v in outcomes.items() if k != "ok") > n // 2  # the mutations do bite


def test_fuzz_gguf_metadata_types(gguf_base, tmp_path):
    rng = random.Random(SEED + 1)
    meta = metadata_of(gguf_base)
    keys = sorted(k for k in meta if not k.startswith("tokenizer.ggml.merges"))
    values = ["abc", -1, 0, 1, 2**31, 2**32 - 1, 2**40, 2**64 - 1, 0.0, -1.5, float("inf"),
              float("nan"), True, ["x", "y"], [1, 2, 3], [[1], [2]], []]
    n = max(CASES // 6, 10)
    outcomes: dict[str, int] = {}
    for i in range(n):
        key, value = rng.choice(keys), rng.choice(values)
        edited = dict(meta, **{key: value})
        if rng.random() < 0.2:
            edited.pop(rng.choice(keys), None)
        path = tmp_path / f"meta{i}.gguf"
        try:
            rewrite_with_meta(gguf_base, path, edited)
        except (ValueError, TypeError, OverflowError, struct.error):
            continue  # the gguf writer itself cannot express this edit
        out = run_case(path, f"metadata case {i} ({key}={value!r}, seed {SEED})")
        outcomes[out] = outcomes.get(out, 0) + 1
        path.unlink()
    print(f"\nGGUF metadata cases: {sum(outcomes.values())}, outcomes {outcomes}")


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from conftest import _randomize

    path = write_model(tmp_path_factory.mktemp("fuzzhf") / "m", LLAMA,
                       hf_weights(reference(LLAMA, _randomize)))
    assert run_case(path, "hf base") == "ok"
    return path


def test_fuzz_config_json(hf_base):
    rng = random.Random(SEED + 2)
    original = (hf_base / "config.json").read_text()
    config = json.loads(original)
    keys = sorted(config) + ["num_local_experts", "rope_scaling", "rope_parameters", "head_dim",
                             "quantization", "tie_word_embeddings"]
    n = max(CASES // 6, 10)
    outcomes: dict[str, int] = {}
    try:
        for i in range(n):
            edited = dict(config)
            for _ in range(rng.randint(1, 3)):
                edited[rng.choice(keys)] = rng.choice(ODD_VALUES + [rng.randint(-5, 2**20)])
            text = json.dumps(edited)
            if rng.random() < 0.2:  # byte-level damage too
                pos = rng.randrange(len(text))
                text = text[:pos] + rng.choice(["{", "]", '"', "\\", "\x00", "9" * 30]) + text[pos:]
            (hf_base / "config.json").write_text(text)
            out = run_case(hf_base, f"config case {i} ({text[:300]}, seed {SEED})")
            outcomes[out] = outcomes.get(out, 0) + 1
    finally:
        (hf_base / "config.json").write_text(original)
    print(f"\nconfig.json cases: {n}, outcomes {outcomes}")
