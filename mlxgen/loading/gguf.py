"""Read a GGUF file (llama.cpp, Ollama) into an HF-style config, MLX weights and a tokenizer.

Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks are repacked bit-exactly into MLX's affine quantized format
(group size 32, fp16 scales/biases); K-quants are repacked by gguf_quants (Q4_K/Q5_K exactly,
Q6_K/Q3_K/Q2_K to the nearest MLX form); other types (IQ*, TQ*) are dequantized to float32 with
the `gguf` package. The header is parsed by gguf_header. On a CPU with mlxgen's kernels built,
the repack of Q4_0..Q8_0, Q4_K, Q5_K and Q6_K is their C++ repack_blocks (the same bytes)."""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize

from ..errors import ModelLoadError, UnsupportedModelError
from . import limits
from .gguf_quants import (K_BITS, K_EXACT, KERNEL_TYPES, compact_words, in_row_chunks,
                          kernel_repack, pack, repack_k, take_packed)
from .gguf_header import TensorInfo, read_gguf_header
from .gguf_tokenizer import TokenizerParts, tokenizer_from_gguf

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                 "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
# Types whose blocks are exactly MLX affine groups of 32 (w = scale * q + bias), and their bits.
NATIVE_BITS = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8}
_FLOAT_DTYPES = {QT.F32: np.float32, QT.F16: np.float16, QT.F64: np.float64}
@dataclass
class GGUFContents:
    config: dict
    weights: dict[str, mx.array]
    quantization: dict | None
    tokenizer: TokenizerParts
    metadata: dict
    header_bytes: int = 0  # the file's header size (the converted-weights cache hashes it)


# byte b -> a uint64 whose byte k holds bit k of b at bit 4: Q5's fifth bits, eight codes at once
_FIFTH_BITS = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
               .astype(np.uint8) << 4).view(np.uint64)[:, 0]
_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _repack_native(raw: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, row_bytes) GGML blocks -> MLX (packed uint32, fp16 scales, fp16 biases)."""
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    f16 = lambda a, b: blocks[..., a:b].copy().view(np.float16)[..., 0]
    d = f16(0, 2)
    with np.errstate(over="ignore"):  # an overflow shows up as inf and is checked by the caller
        offset = -d * np.float16(128 if qtype == QT.Q8_0 else 16 if qtype == QT.Q5_0 else 8)
    if qtype == QT.Q8_0:  # q in int8: store q + 128 (flipping the sign bit) with bias -128 d
        return pack(blocks[..., 2:] ^ 0x80, 8), d, offset
    low_at = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q5_0: 6, QT.Q5_1: 8}[qtype]
    qs = blocks[..., low_at:]  # element j in the low nibble of byte j, element j+16 in the high
    bits = NATIVE_BITS[qtype]
    bias = f16(2, 4) if qtype in (QT.Q4_1, QT.Q5_1) else offset
    if bits == 4:  # reorder nibbles straight into MLX's order (element 2b low, 2b+1 high)
        even, odd = qs[..., 0::2], qs[..., 1::2]
        packed = np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], -1)
        return packed.reshape(raw.shape[0], -1).view(np.uint32), d, bias
    # Q5, eight codes per uint64: words 0-1 are the low nibbles (elements 0-15), words 2-3 the
    # high ones (16-31); the 5th bit of element j is bit j of the little-endian 32-bit qh.
    rows, n_blocks = blocks.shape[:2]
    nibbles = np.ascontiguousarray(qs).view(np.uint64)
    words = np.empty((rows, n_blocks, 4), np.uint64)
    np.bitwise_and(nibbles, _NIBBLES, out=words[..., :2])
    np.right_shift(nibbles, np.uint64(4), out=words[..., 2:])
    words[..., 2:] &= _NIBBLES
    words |= _FIFTH_BITS[blocks[..., low_at - 4 : low_at]]
    return take_packed(compact_words(words, bits), bits, rows), d, bias


def quantized_bits(qtype: QT) -> int | None:
    """MLX bits a GGML type is kept at (group size 32), or None when it is dequantized."""
    return NATIVE_BITS.get(qtype) or K_BITS.get(qtype)


_MX_DTYPES = {np.dtype(np.uint32): mx.uint32, np.dtype(np.float16): mx.float16,
              np.dtype(np.float32): mx.float32}


class _MlxOutputs:
    """An in_row_chunks allocator: MLX arrays, handed out as writable numpy views of the same
    memory, so repacked rows land in the model's buffers with no whole-tensor copy in between.
    float16 parts (scales, biases) are allocated in scale_dtype (exact: fp16 widens losslessly)."""

    def __init__(self, scale_dtype: mx.Dtype, empty: Callable | None = None):
        # empty(shape, dtype): the CPU kernels' uninitialized MLX array, for a writer that fills
        # every byte (their repack): no zero-fill pass
        self.scale_dtype, self.arrays, self.empty = scale_dtype, [], empty

    def __call__(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        dtype = self.scale_dtype if np.dtype(dtype) == np.float16 else _MX_DTYPES[np.dtype(dtype)]
        if self.empty is not None:
            array = self.empty(list(shape), dtype)
        else:
            array = mx.zeros(shape, dtype)
            mx.eval(array)
        self.arrays.append(array)
        return np.array(array, copy=False)


def _tensor_arrays(buf: mmap.mmap, t: TensorInfo, keep: bool, scale_dtype: mx.Dtype = mx.float16,
                   repack: ModuleType | None = None) -> list[mx.array]:
    """One array, or [weight, scales, biases] when kept MLX-quantized.

    Reads straight from the mapped file: only this tensor's repacked arrays are allocated.
    repack: the CPU kernels (backends.gguf_repack: their repack_blocks and empty), else numpy
    repacks into zero-filled arrays."""
    if t.qtype in _FLOAT_DTYPES:  # F64 has no MLX dtype: narrowed to float32
        arr = np.frombuffer(buf, _FLOAT_DTYPES[t.qtype], math.prod(t.shape), t.offset)
        arr = arr.reshape(t.shape)
        return [mx.array(arr.astype(np.float32) if t.qtype == QT.F64 else arr)]
    if t.qtype == QT.BF16:
        raw16 = np.frombuffer(buf, np.uint16, math.prod(t.shape), t.offset).reshape(t.shape)
        return [mx.array(raw16).view(mx.bfloat16)]
    lead = t.shape[:-1]
    raw = np.frombuffer(buf, np.uint8, t.nbytes, t.offset).reshape(math.prod(lead), -1)
    if keep:
        fast = repack is not None and t.qtype in KERNEL_TYPES
        out = _MlxOutputs(scale_dtype if scale_dtype in (mx.float16, mx.float32) else mx.float16,
                          repack.empty if fast else None)
        kernel = repack.repack_blocks if fast else None
        if t.qtype in NATIVE_BITS:
            if kernel is not None:
                triplet, _, finite = kernel_repack(raw, t.qtype, NATIVE_BITS[t.qtype], out, kernel)
            else:
                triplet = in_row_chunks(raw, t.qtype, lambda rows: _repack_native(rows, t.qtype),
                                        out)
                finite = np.isfinite(triplet[2]).all()
            if not finite:  # fp16 overflow of -128*d: the one inexact case
                triplet = None
        else:
            triplet = repack_k(raw, t.qtype, out, kernel)  # None on an fp16 overflow
        if triplet is not None:
            return [a.reshape(*lead, -1) for a in out.arrays]
    try:
        values = gguf_dequantize(raw, t.qtype)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"tensor {t.name} uses GGML type {t.qtype.name}, which cannot be dequantized here; "
            "use a GGUF quantized as Q4_K_M, Q8_0 or similar."
        ) from None
    return [mx.array(values.reshape(t.shape))]


def _load_tensor(buf: mmap.mmap, t: TensorInfo, keep: bool, scale_dtype: mx.Dtype = mx.float16,
                 repack: ModuleType | None = None) -> list[mx.array]:
    arrays = _tensor_arrays(buf, t, keep, scale_dtype, repack)
    _release_pages(buf, t)
    return arrays


def _release_pages(buf: mmap.mmap, t: TensorInfo) -> None:
    # The tensor now lives in MLX memory: unmap its file pages so the process is not charged
    # for the whole file on top of the weights (they stay in the OS page cache).
    if hasattr(buf, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        start = t.offset - t.offset % mmap.PAGESIZE
        buf.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)


_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Gemma's four norms per layer: llama.cpp's ffn_norm is the pre-feed-forward one there.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps q/k/v and gate/up fused (the model splits them at load: llama.Model.sanitize).
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def hf_module_name(gguf_name: str, arch: str = "llama") -> tuple[str, str]:
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj', 'weight')."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    names = (_GEMMA_LAYER_NAMES if arch.startswith("gemma")
             else _PHI3_LAYER_NAMES if arch == "phi3" else _LAYER_NAMES)
    if len(parts) == 1 and stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem], suffix
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}", suffix
    raise UnsupportedModelError(
        f"GGUF tensor {gguf_name!r} has no place in the supported llama/qwen2/qwen3/qwen3_moe/gemma "
        "layouts; this file holds a variant mlxgen cannot run."
    )


def _unpermute_rows(x: mx.array, n_head: int) -> mx.array:
    # llama.cpp stores each head's rows of Q/K as interleaved (re, im) pairs for its RoPE;
    # HF's rotate-half layout wants the two halves contiguous: (h, d/2, 2) -> (h, 2, d/2).
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"Q/K projection with {rows} rows does not split into {n_head} heads.")
    y = x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:])
    return mx.swapaxes(y, 1, 2).reshape(x.shape)


def _config(meta: dict, arch: str, names, vocab_size: int, path: Path) -> dict:
    """HF-style config from GGUF metadata; names: the tensor names (or a name -> shape mapping,
    then the config is also checked against the tensor shapes, mlxgen/loading/limits.py)."""
    def get(key: str, default: Any = KeyError, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ModelLoadError(
                f"{path}: required GGUF metadata key '{arch}.{key}' is missing; the file is "
                "incomplete or from an incompatible converter. Re-convert it with llama.cpp."
            )
        if isinstance(value, list):  # per-layer arrays: fine only when uniform
            if not value or not all(type(v) is type(value[0]) for v in value):
                raise ModelLoadError(f"{path}: '{arch}.{key}' is a malformed per-layer array.")
            if len(set(value)) != 1:
                raise UnsupportedModelError(f"{path}: per-layer '{arch}.{key}' is not supported.")
            value = value[0]
        if value is None or value is default or kind is str:
            return value
        ok = limits.is_int(value) if kind is int else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            raise ModelLoadError(f"{path}: GGUF metadata '{arch}.{key}' must be "
                                 f"{'an integer' if kind is int else 'a finite number'}, got "
                                 f"{value!r}; the file is corrupt. Re-download or re-convert it.")
        return kind(value)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    if not limits.is_int(heads) or heads < 1:
        raise ModelLoadError(f"{path}: GGUF metadata '{arch}.attention.head_count' must be >= 1; "
                             f"got {heads!r}. The file is corrupt; re-download it.")
    moe = arch == "qwen3moe"
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length", None if moe else KeyError) or 0,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "vocab_size": vocab_size,
        "rope_theta": get("rope.freq_base", 10000.0, kind=float),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_scaling": None,
        "rope_freq_factors": None,
    }
    scaling = get("rope.scaling.type", "none", kind=str)
    if scaling == "linear":
        factor = get("rope.scaling.factor", kind=float)
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":  # passed on so the model can refuse it by name
        config["rope_scaling"] = {
            "rope_type": scaling, "factor": get("rope.scaling.factor", 1.0, kind=float),
            "original_max_position_embeddings": get("rope.scaling.original_context_length", None),
        }
    if arch.startswith("gemma"):
        layers = config["num_hidden_layers"]
        config["sliding_window"] = get("attention.sliding_window")
        # llama.cpp scales attention by head_dim^-1/2, except the 27B models (hidden / heads).
        big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
        config["query_pre_attn_scalar"] = hidden // heads if big else config["head_dim"]
        # Ollama's own converter writes the two RoPE bases of Gemma 3 under these names.
        config["rope_theta"] = get("rope.global.freq_base", config["rope_theta"], kind=float)
        if get("rope.local.freq_base", None, kind=float) is not None:
            config["rope_local_base_freq"] = get("rope.local.freq_base", kind=float)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key, None, kind=float) is not None:
                config[key] = get(key, kind=float)
    if arch == "phi3":
        rotary = get("rope.dimension_count", None)
        if rotary is not None:
            config["partial_rotary_factor"] = rotary / config["head_dim"]
        if get("attention.sliding_window", None):
            config["sliding_window"] = get("attention.sliding_window")
        if set(names) & {"rope_factors_long.weight", "rope_factors_short.weight"}:  # LongRoPE tensors
            original = get("rope.scaling.original_context_length", None)
            config["rope_scaling"] = {
                "rope_type": "longrope", "original_max_position_embeddings": original,
                "attention_factor": get("rope.scaling.attn_factor", None, kind=float),
            }
    if moe:
        config.update(
            num_experts=get("expert_count"),
            num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length"),
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
        config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    keys = {**{field: f"GGUF metadata '{arch}.{key}'" for field, key in _GGUF_KEYS.items()},
            "vocab_size": "the GGUF vocabulary (tokenizer.ggml.tokens)"}
    limits.check_config(config, str(path), keys)
    if isinstance(names, dict):
        shapes = {}
        for name, shape in names.items():
            try:
                module, suffix = hf_module_name(name, arch)
            except UnsupportedModelError:
                continue  # rope_freqs and the like; unknown names are refused when loaded
            shapes[f"{module}.{suffix}"] = shape
        limits.check_against_weights(config, shapes, str(path), keys)
    return config


_GGUF_KEYS = {
    "hidden_size": "embedding_length", "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length", "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count", "moe_intermediate_size": "expert_feed_forward_length",
}


def read_gguf(
    path: str | os.PathLike, dequantize: bool = False, k_quants: bool = True,
    scale_dtype: mx.Dtype = mx.float16, projection_scale_dtype: mx.Dtype | None = None,
    repack: ModuleType | None = None,
) -> GGUFContents:
    """Load a llama/qwen2/qwen3/qwen3moe/gemma2/gemma3/phi3 GGUF as an HF-layout config, weights
    and tokenizer.

    dequantize: every tensor as float (the gguf package's values). Otherwise Q4_0..Q8_0 stay
    MLX-quantized (bit-exact), and with k_quants the K-quants too (Q4_K/Q5_K up to fp16 scales,
    Q6_K/Q3_K/Q2_K in their nearest MLX form); without, those are float32 as gguf computes them.
    scale_dtype: float16 (as GGUF stores them) or float32 (the same values, for a model that
    will run in float32: saves converting them afterwards). projection_scale_dtype: the same
    for every quantized tensor but the embedding and expert stacks (default scale_dtype): the
    CPU backend keeps a float32 model's projection scales in float16. repack: the CPU kernels
    (backends.gguf_repack: the same bytes, faster), else numpy repacks."""
    path = Path(path)
    header = read_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}. Use a model of one of these families."
        )
    tokenizer = tokenizer_from_gguf(meta)
    names = {t.name: t.shape for t in header.tensors}
    config = _config(meta, arch, names, len(meta["tokenizer.ggml.tokens"]), path)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    weights: dict[str, mx.array] = {}
    quantization: dict[str, Any] = {}
    native_types, dequantized_types, approximated = Counter(), Counter(), Counter()
    # llama3.1-style per-frequency divisors, and Phi-3's LongRoPE factors: config, not weights.
    rope_tables = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
    jobs = []  # every name is checked before any tensor is read
    for t in header.tensors:
        if arch == "gemma3" and t.name.startswith(("v.", "mm.")):
            continue  # the vision tower and projector of a multimodal file: text only here
        rope = t.name in rope_tables
        keep = not dequantize and not rope and quantized_bits(t.qtype) is not None and (
            len(t.shape) >= 2 and (k_quants or t.qtype in NATIVE_BITS))
        jobs.append((t, keep, ("", "") if rope else hf_module_name(t.name, arch)))
    projection_scale_dtype = projection_scale_dtype or scale_dtype
    for t, keep, (module, suffix) in jobs:
        own = module == "model.embed_tokens" or ".experts." in module
        arrays = _load_tensor(header.buffer, t, keep, scale_dtype if own else projection_scale_dtype,
                              repack)
        if t.name == "rope_freqs.weight":
            config["rope_freq_factors"] = arrays[0].astype(mx.float32).tolist()
            continue
        if t.name in rope_tables:
            factors = arrays[0].astype(mx.float32).tolist()
            config["rope_scaling"]["long_factor" if "long" in t.name else "short_factor"] = factors
            continue
        kind = t.name.split(".")[-2]
        if arch == "llama" and kind in heads:
            arrays = [_unpermute_rows(a, heads[kind]) for a in arrays]
        if arch.startswith("gemma") and kind.endswith("norm"):  # llama.cpp stored 1 + w
            arrays = [a - 1.0 for a in arrays]
        if len(arrays) == 3:
            for key, array in zip(("weight", "scales", "biases"), arrays):
                weights[f"{module}.{key}"] = array
            quantization[module] = {"group_size": 32, "bits": quantized_bits(t.qtype)}
            native_types[t.qtype.name] += 1
            if t.qtype not in NATIVE_BITS and t.qtype not in K_EXACT:
                approximated[t.qtype.name] += 1
        else:
            weights[f"{module}.{suffix}"] = arrays[0]
            if t.qtype not in _FLOAT_DTYPES and t.qtype != QT.BF16:
                dequantized_types[t.qtype.name] += 1
    if quantization:  # default = the most common native setting; every module is listed too
        bits = Counter(q["bits"] for q in quantization.values()).most_common(1)[0][0]
        for module, setting in list(quantization.items()):
            for fused, parts in _FUSED.items():  # split projections keep the fused tensor's
                if module.endswith(fused):
                    for part in parts:
                        quantization[module.removesuffix(fused) + part] = setting
        quantization = {"group_size": 32, "bits": bits, **quantization}
    unkept = sorted(n for n in dequantized_types if quantized_bits(QT[n]) is None)
    if unkept and not dequantize:
        logger.warning("%s: %s tensors have no MLX quantized form and are kept as float32",
                       path.name, ", ".join(unkept))

    file_type = meta.get("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        file_type_name = None
    metadata = {
        "architecture": arch,
        "name": meta.get("general.name"),
        "size_label": meta.get("general.size_label"),
        "file_type": file_type_name,
        "gguf_version": header.version,
        "tensor_types": dict(Counter(t.qtype.name for t in header.tensors)),
        "native_quantized": dict(native_types),
        "dequantized": dict(dequantized_types),
        "approximated": dict(approximated),  # kept quantized within the bound in gguf_quants
        "parameters": sum(math.prod(t.shape) for t in header.tensors),
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
    }
    return GGUFContents(config, weights, quantization or None, tokenizer, metadata,
                        header.data_start)
