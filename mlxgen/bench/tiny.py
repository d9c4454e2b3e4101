"""A tiny random Llama written as a Hugging Face directory: loadable by mlxgen, mlx-lm and
`mlx_lm.server`, so the harness, its tests and the notebook run without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .prompts import FILLER


def _train_tokenizer(vocab_size: int):
    # Byte-level BPE encodes any text; training on the filler keeps prompts token-efficient.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([FILLER] * 4 + ["[run 0123456789abcdef] "], trainer)
    return tk


def write_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    context: int = 8192,
    seed: int = 0,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tk = _train_tokenizer(vocab_size)
    tk.save(str(path / "tokenizer.json"))
    vocab = tk.get_vocab_size()
    head_dim = hidden_size // heads
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "model_max_length": context,
    }, indent=2))
    mx.random.seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden_size), "model.norm.weight": (hidden_size,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (heads * head_dim, hidden_size),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden_size),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden_size),
            f"{p}.self_attn.o_proj.weight": (hidden_size, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": (intermediate_size, hidden_size),
            f"{p}.mlp.up_proj.weight": (intermediate_size, hidden_size),
            f"{p}.mlp.down_proj.weight": (hidden_size, intermediate_size),
            f"{p}.input_layernorm.weight": (hidden_size,),
            f"{p}.post_attention_layernorm.weight": (hidden_size,),
        })
    weights = {
        k: mx.ones(s) if len(s) == 1 else mx.random.normal(s) * 0.05 for k, s in shapes.items()
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path
