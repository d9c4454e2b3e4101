"""Our models against an independent implementation: transformers' PyTorch models.

The transformers model is built from a tiny config, given random weights, and its state_dict
(HF tensor names) and `config.to_dict()` (the transformers>=5 layout: `rope_parameters`,
`num_local_experts`) are what we load. Qwen3-MoE is checked with the experts both as
transformers>=5 holds them in memory (fused `gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I))
and as checkpoints store them (one tensor per expert, what `save_pretrained` writes)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed (pip install 'mlxgen[oracle]'); no torch oracle"
)
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; no PyTorch reference models"
)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxgen.loading import build_model, hf  # noqa: E402

TOL = 1e-4
VOCAB = 256

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CASES = {
    "llama-llama3-rope": dict(
        BASE, model_type="llama", rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama-linear-rope": dict(BASE, model_type="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    # SmolLM2-like shape (3 heads, 1 kv head, tied) plus Llama's optional biases everywhere.
    "llama-bias-tied": dict(BASE, model_type="llama", hidden_size=96, num_attention_heads=3,
                            num_key_value_heads=1, rope_theta=100000.0, tie_word_embeddings=True,
                            attention_bias=True, mlp_bias=True),
    "mistral": dict(BASE, model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    "qwen2": dict(BASE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, rope_theta=1000000.0,
                  tie_word_embeddings=True),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", num_hidden_layers=3, head_dim=32,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True),
}


def hf_model(case: str, seed: int = 0, scale: float = 0.15):
    """A transformers model in float32/eager attention with random, non-trivial weights.

    scale 0.15 keeps logits' std around 1.2-1.5 while float32 rounding in both implementations
    (each measured against torch float64) stays well under TOL; at 0.2 the biased 96-wide llama
    drifts to ~1e-4 on 300 tokens from summation order alone."""
    kw = dict(CASES[case])
    model_type = kw.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + scale * noise if name.endswith("norm.weight") else scale * noise)
    return model.eval()


def to_mx(state_dict) -> dict[str, mx.array]:
    return {k: mx.array(v.detach().cpu().float().numpy()) for k, v in state_dict.items()}


def per_expert(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Fused transformers>=5 expert tensors -> one tensor per expert, as checkpoints hold them."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = hf_model(case, seed=len(cache) + 1)
        return cache[case]

    return get


def _compare(ours, ref_model, record_diff, label: str):
    rng = np.random.default_rng(0)
    for n in (7, 300):
        ids = rng.integers(0, VOCAB, size=(1, n))
        want = torch_logits(ref_model, ids)
        assert want.std() > 0.5  # non-trivial weights
        got = ours(mx.array(ids))
        diff = record_diff(got, mx.array(want), f"{label} L={n}")
        assert diff <= TOL, f"{label} L={n}: max abs diff {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, record_diff, case):
    ref = models(case)
    config = ref.config.to_dict()
    assert "rope_parameters" in config  # the transformers>=5 layout is what we load here
    weights = to_mx(ref.state_dict())
    if case == "qwen3_moe":
        assert "model.layers.0.mlp.experts.gate_up_proj" in weights  # fused in memory
        assert "num_local_experts" in config
    ours = build_model(config, weights)
    _compare(ours, ref, record_diff, "state_dict")


def test_moe_per_expert_layout(models, record_diff):
    ref = models("qwen3_moe")
    weights = per_expert(to_mx(ref.state_dict()))
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in weights
    assert not any(k.endswith("gate_up_proj") for k in weights)
    ours = build_model(ref.config.to_dict(), weights)
    _compare(ours, ref, record_diff, "per-expert")


def test_moe_fused_split_order(models):
    """gate is the first half of gate_up_proj, up the second: swapping them must matter."""
    ref = models("qwen3_moe")
    weights = to_mx(ref.state_dict())
    ours = build_model(ref.config.to_dict(), weights)
    experts = ours.layers[0].mlp.experts
    fused = weights["model.layers.0.mlp.experts.gate_up_proj"]
    inter = fused.shape[1] // 2
    assert mx.array_equal(experts.gate_proj.weight, fused[:, :inter])
    assert mx.array_equal(experts.up_proj.weight, fused[:, inter:])
    assert mx.array_equal(experts.down_proj.weight, weights["model.layers.0.mlp.experts.down_proj"])


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3"])
def test_save_pretrained_checkpoint(models, record_diff, tmp_path, case):
    """What transformers writes to disk (config.json, model.safetensors) loads into ours."""
    ref = models(case)
    ref.save_pretrained(tmp_path)
    config = hf.read_config(tmp_path)
    weights = hf.read_weights(tmp_path)
    if case == "qwen3_moe":
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in weights
    ours = build_model(config, weights)
    _compare(ours, ref, record_diff, "save_pretrained")
