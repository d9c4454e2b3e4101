"""Generation on a tiny random model: prompt forms, sampling, stop strings, eos, stats, bad input."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import mlxgen
from mlxgen.errors import ConfigError, MlxgenError, PromptTooLongError
from mlxgen.models import model_from_config

CORPUS = [
    "The capital of France is Paris. Paris is lovely in spring.",
    "日本語のテキストと絵文字 🎉🚀 を含む文章です。",
    "Ünïcödé àccents — naïve café; emoji 👩‍💻 and math ∑∫√.",
    "def add(a, b):\n    return a + b\n",
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size=300) -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 3, trainer)
    return tk


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_tokenizer()
    # No eos by default so greedy runs are long enough to test; the eos test adds one.
    tokenizer = mlxgen.Tokenizer(hf, chat_template=TEMPLATE)
    config = dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=hf.get_vocab_size(),
        max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    mx.random.seed(0)
    model = model_from_config(config)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.5, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    return mlxgen.build_model(config, weights), tokenizer


def tokens_of(model, tokenizer, prompt, **kw):
    return [r.token for r in mlxgen.stream_generate(model, tokenizer, prompt, **kw)]


def greedy_reference(model, ids, n):
    """Greedy tokens by full forward passes, no cache: what generation must reproduce."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array(ids)[None])[0, -1]
        out.append(mx.argmax(logits).item())
        ids.append(out[-1])
    return out


def test_greedy_matches_cacheless_forward(tiny):
    model, tok = tiny
    ids = tok.encode("The capital of France is")
    got = tokens_of(model, tok, ids, max_tokens=12)
    eos = tok.eos_token_ids
    want = greedy_reference(model, ids, 12)
    cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
    assert got == want[:cut]


def test_prompt_forms_agree(tiny):
    model, tok = tiny
    text = "Paris is lovely"
    assert tokens_of(model, tok, text, max_tokens=5) == tokens_of(model, tok, tok.encode(text), max_tokens=5)
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == "<|user|>Hi<|end|><|assistant|>"
    chat_ids = tok.encode(rendered, add_special_tokens=False)
    assert tokens_of(model, tok, messages, max_tokens=5) == tokens_of(model, tok, chat_ids, max_tokens=5)


def test_seeded_sampling_is_deterministic(tiny):
    model, tok = tiny
    kw = dict(max_tokens=16, temperature=1.5)
    a = tokens_of(model, tok, "Paris", seed=1, **kw)
    b = tokens_of(model, tok, "Paris", seed=1, **kw)
    c = tokens_of(model, tok, "Paris", seed=2, **kw)
    assert a == b
    assert a != c


@pytest.mark.parametrize("mask", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_masks_that_leave_one_token_give_greedy(tiny, mask):
    model, tok = tiny
    greedy = tokens_of(model, tok, "Paris", max_tokens=10)
    for seed in range(3):
        assert tokens_of(model, tok, "Paris", max_tokens=10, temperature=2.0, seed=seed, **mask) == greedy


def test_top_k_limits_choices(tiny):
    model, tok = tiny
    ids = tok.encode("Paris")
    logits = model(mx.array(ids)[None])[0, -1]
    top3 = set(mx.argsort(-logits)[:3].tolist())
    firsts = {tokens_of(model, tok, ids, max_tokens=1, temperature=5.0, top_k=3, seed=s)[0] for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


def test_repetition_penalty_window(tiny):
    model, tok = tiny
    ids = tok.encode("Paris")
    window = 6
    out = tokens_of(model, tok, ids, max_tokens=30, repetition_penalty=1e6, repetition_context_size=window)
    seq = ids + out
    for i in range(len(ids), len(seq)):
        assert seq[i] not in seq[max(0, i - window) : i], f"token {i} repeats within the window"
    plain = tokens_of(model, tok, ids, max_tokens=30)
    assert len(out) == len(plain) == 30 and plain != out  # the penalty changed something


def test_stop_strings_and_streaming_text(tiny):
    model, tok = tiny
    full = mlxgen.generate(model, tok, "Paris", max_tokens=20)
    assert len(full) >= 4
    stop = full[2:4]
    cut = mlxgen.generate(model, tok, "Paris", max_tokens=20, stop=[stop])
    assert cut == full[: full.find(stop)]
    last = list(mlxgen.stream_generate(model, tok, "Paris", max_tokens=20, stop=[stop]))[-1]
    assert last.finish_reason == "stop"


def test_eos_ends_generation_and_is_not_emitted(tiny):
    model, tok = tiny
    ids = tok.encode("Paris")
    first = tokens_of(model, tok, ids, max_tokens=1)[0]
    tok.eos_token_ids.add(first)
    try:
        responses = list(mlxgen.stream_generate(model, tok, ids, max_tokens=10))
    finally:
        tok.eos_token_ids.discard(first)
    assert len(responses) == 1 and responses[0].finish_reason == "stop" and responses[0].text == ""


def test_stats(tiny):
    model, tok = tiny
    responses = list(mlxgen.stream_generate(model, tok, "Paris is lovely", max_tokens=8))
    s = responses[-1].stats
    assert s.prompt_tokens == len(tok.encode("Paris is lovely"))
    assert s.generation_tokens == len(responses)
    assert 0 < s.ttft_s < 60 and s.prefill_tps > 0 and s.peak_memory_gb > 0
    if len(responses) > 1:
        assert s.decode_tps > 0
    assert responses[-1].finish_reason in ("stop", "length")


def test_multibyte_streaming_never_splits_characters(tiny):
    _, tok = tiny
    for text in CORPUS[1:3]:
        ids = tok.encode(text)
        detok = tok.detokenizer()
        pieces = [detok.add_token(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
        # Byte-level BPE splits some characters over several tokens: the stream held them back.
        assert any(p == "" for p in pieces)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 1.5},
        {"min_p": 2}, {"max_tokens": 0}, {"repetition_penalty": 0}, {"repetition_context_size": 0},
        {"seed": "x"}, {"stop": [""]}, {"recompute": 2.0}, {"recompute_strategy": "bogus"},
    ],
)
def test_invalid_sampling_values(tiny, kw):
    model, tok = tiny
    with pytest.raises(ConfigError) as e:
        mlxgen.generate(model, tok, "Paris", **kw)
    assert list(kw)[0] in str(e.value)


def test_bad_prompts(tiny):
    model, tok = tiny
    with pytest.raises(PromptTooLongError, match="context is 256"):
        mlxgen.generate(model, tok, [1] * 300)
    with pytest.raises(MlxgenError, match="empty"):
        mlxgen.generate(model, tok, [])
    with pytest.raises(MlxgenError, match="token ids"):
        mlxgen.generate(model, tok, [1, 10**6])
    with pytest.raises(MlxgenError, match="role"):
        mlxgen.generate(model, tok, [{"content": "no role"}])
    with pytest.raises(MlxgenError, match="prompt must be"):
        mlxgen.generate(model, tok, 3.5)


def test_generation_stops_at_context_end(tiny):
    model, tok = tiny
    responses = list(mlxgen.stream_generate(model, tok, [5] * 250, max_tokens=50))
    assert len(responses) <= 6
    if responses[-1].finish_reason != "stop":
        assert responses[-1].finish_reason == "length" and len(responses) == 6


def test_prefill_chunk_env(tiny, monkeypatch):
    model, tok = tiny
    ids = tok.encode(CORPUS[0] + CORPUS[3])
    want = tokens_of(model, tok, ids, max_tokens=6)
    monkeypatch.setenv("MLXGEN_PREFILL_CHUNK_SIZE", "3")
    assert tokens_of(model, tok, ids, max_tokens=6) == want
    monkeypatch.setenv("MLXGEN_PREFILL_CHUNK_SIZE", "three")
    with pytest.raises(ConfigError, match="MLXGEN_PREFILL_CHUNK_SIZE"):
        tokens_of(model, tok, ids, max_tokens=6)
