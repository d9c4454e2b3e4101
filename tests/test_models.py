"""Our MLX models against mlx-lm's implementations, for every supported architecture.

Each case builds mlx-lm's `Model` from the classic config layout (top-level rope_theta /
rope_scaling), fills it with random weights, and loads the same tensors into ours through
`build_model`, fed either the same classic config or its transformers>=5 form
(`rope_parameters`, `num_local_experts`). The KV cache and chunked prefill are then checked
against our own full forward."""

from __future__ import annotations

import copy
import importlib

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxgen.cache import make_cache
from mlxgen.errors import ModelLoadError, UnsupportedModelError
from mlxgen.loading import build_model
from mlxgen.models import SUPPORTED_MODEL_TYPES, ModelArgs, model_from_config
from mlxgen.models.rope import RoPE
from mlxgen.prefill import prefill

TOL = 1e-4
VOCAB = 256

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)

# llama3 scaling with a small original context so all three bands of the frequency table
# (kept, interpolated, stretched) occur for head_dim 16 and a 300-token input.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CONFIGS = {
    "llama": dict(BASE, model_type="llama"),
    "llama-llama3-rope": dict(BASE, model_type="llama", rope_theta=500000.0,
                              rope_scaling=LLAMA3_SCALING),
    "llama-linear-rope": dict(BASE, model_type="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    "mistral": dict(BASE, model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    # SmolLM2: llama with tied embeddings, 3 heads / 1 kv head, theta 1e5.
    "smollm2": dict(BASE, model_type="llama", hidden_size=96, num_attention_heads=3,
                    num_key_value_heads=1, rope_theta=100000.0, tie_word_embeddings=True),
    "qwen2": dict(BASE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    # Qwen3: q/k norm and head_dim 32 != 64 / 4.
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, rope_theta=1000000.0,
                  tie_word_embeddings=True),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", num_hidden_layers=3, head_dim=32,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True),
    # Every second layer sparse, the last one forced dense, un-normalised top-k weights.
    "qwen3_moe-sparse-step": dict(BASE, model_type="qwen3_moe", num_hidden_layers=4, head_dim=16,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False),
}

MLX_LM_MODULE = {"mistral": "llama"}


def to_v5_layout(config: dict) -> dict:
    """The transformers>=5 form of a classic config: rope settings under `rope_parameters`."""
    cfg = copy.deepcopy(config)
    scaling = dict(cfg.pop("rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    cfg["rope_parameters"] = {"rope_type": rope_type, **scaling, "rope_theta": cfg.pop("rope_theta")}
    if "num_experts" in cfg:
        cfg["num_local_experts"] = cfg.pop("num_experts")
    return cfg


def reference_model(config: dict, seed: int, randomize):
    name = MLX_LM_MODULE.get(config["model_type"], config["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{name}")
    model = module.Model(module.ModelArgs.from_dict(config))
    randomize(model, seed=seed)
    return model


def tokens(n: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, VOCAB, (1, n), key=mx.random.key(seed))


@pytest.fixture(scope="module")
def pairs(randomize):
    """(name, layout) -> (ours, mlx-lm reference), built once per module."""
    built = {}

    def get(name: str, layout: str):
        if (name, layout) not in built:
            classic = CONFIGS[name]
            ref = reference_model(classic, seed=sorted(CONFIGS).index(name), randomize=randomize)
            # mlx-lm's own names (experts under `switch_mlp`): our sanitize maps them.
            weights = dict(tree_flatten(ref.parameters()))
            cfg = classic if layout == "classic" else to_v5_layout(classic)
            built[name, layout] = (build_model(cfg, weights), ref)
        return built[name, layout]

    return get


@pytest.mark.parametrize("layout", ["classic", "v5"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_mlx_lm(pairs, record_diff, name, layout):
    ours, ref = pairs(name, layout)
    for n in (7, 300):
        x = tokens(n, seed=n)
        a, b = ours(x), ref(x)
        assert a.shape == (1, n, VOCAB)
        # The weights are non-trivial: logits vary a lot across the vocabulary and positions.
        assert mx.std(b).item() > 0.5
        assert mx.abs(b[0, 0] - b[0, -1]).max().item() > 0.1
        diff = record_diff(a, b, f"L={n}")
        assert diff <= TOL, f"{name}/{layout} L={n}: max abs diff {diff}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_v5_layout_parses_like_classic(name):
    classic = ModelArgs.from_config(CONFIGS[name])
    v5 = ModelArgs.from_config(to_v5_layout(CONFIGS[name]))
    assert v5 == classic
    if name.startswith("qwen3_moe"):
        assert v5.num_experts == CONFIGS[name]["num_experts"]


def test_moe_layer_placement(pairs):
    from mlxgen.models.qwen3_moe import SparseMoE

    for name, sparse in (("qwen3_moe", [0, 2]), ("qwen3_moe-sparse-step", [1])):
        ours, _ = pairs(name, "v5")
        got = [i for i, layer in enumerate(ours.layers) if isinstance(layer.mlp, SparseMoE)]
        assert got == sparse, name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_matches_full_forward(pairs, record_diff, name):
    """Prefill 250 tokens, then decode one at a time across the cache's 256-token growth step."""
    ours, _ = pairs(name, "v5")
    n_prefill, total = 250, 264
    x = tokens(total, seed=3)
    full = ours(x)
    cache = ours.make_cache()
    steps = [ours(x[:, :n_prefill], cache)]
    for i in range(n_prefill, total):
        steps.append(ours(x[:, i : i + 1], cache))
    inc = mx.concatenate(steps, axis=1)
    assert cache[0].offset == total
    diff = record_diff(inc, full)
    assert diff <= TOL


LENGTH = 270  # past the cache's 256-token growth step


@pytest.mark.parametrize("chunk", [1, 7, 64, 90, LENGTH, 512])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_matches_unchunked(pairs, record_diff, name, chunk):
    ours, _ = pairs(name, "v5")
    x = tokens(LENGTH, seed=5)
    ref_cache = ours.make_cache()
    ref_logits = ours(x, ref_cache)[:, -1, :]
    cache = ours.make_cache()
    last = prefill(ours, x[0], cache, chunk_size=chunk)
    assert last.shape == (1, VOCAB)
    diff = record_diff(last, ref_logits, f"chunk={chunk}")
    assert diff <= TOL
    for got, want in zip(cache, ref_cache):
        assert got.offset == want.offset == LENGTH
        for a, b in zip(got.state, want.state):
            assert mx.abs(a[..., :LENGTH, :] - b[..., :LENGTH, :]).max().item() <= TOL


@pytest.mark.parametrize("mode", ["none", "standard", "pre-rope"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_last_only_runs_the_last_layer_for_one_row(pairs, name, mode, monkeypatch):
    """last_only gives the full forward's last logits and the same cache, while the last layer's
    MLP sees one row (the cheap path really runs) and every other layer sees all of them."""
    ours, _ = pairs(name, "v5")
    x = tokens(40, seed=9)
    rows = []
    for cls in {type(layer.mlp) for layer in ours.layers}:  # dense and MoE feed-forwards
        def counted(self, h, call=cls.__call__):
            rows.append(h.shape[1])
            return call(self, h)

        monkeypatch.setattr(cls, "__call__", counted)
    caches = [None, None] if mode == "none" else [make_cache(len(ours.layers), mode) for _ in "ab"]
    for cache in caches:  # a cache that already holds tokens: queries sit at an offset
        if cache is not None:
            ours(x[:, :15], cache)
    rows.clear()
    want = ours(x[:, 15:], caches[0])[:, -1:]
    got = ours(x[:, 15:], caches[1], last_only=True)
    n = len(ours.layers)
    assert rows == [25] * n + [25] * (n - 1) + [1]
    assert got.shape == want.shape == (1, 1, VOCAB)
    assert mx.abs(got - want).max().item() <= TOL
    if mode != "none":
        for a, b in zip(caches[0], caches[1]):
            assert a.offset == b.offset == 40
            for s, t in zip(a.state, b.state):
                assert mx.array_equal(s[..., :40, :], t[..., :40, :])


def test_prefill_rejects_bad_input(pairs):
    ours, _ = pairs("llama", "classic")
    with pytest.raises(ValueError):
        prefill(ours, [], ours.make_cache())
    with pytest.raises(ValueError):
        prefill(ours, mx.zeros((2, 3), dtype=mx.int32), ours.make_cache())


# --- RoPE variants ---------------------------------------------------------------------------


def _same_weights_other_rope(pairs, rope_cfg: dict) -> tuple:
    ours, _ = pairs("llama", "classic")
    weights = dict(tree_flatten(ours.parameters()))
    return ours, build_model(dict(CONFIGS["llama"], **rope_cfg), weights)


@pytest.mark.parametrize(
    "rope_cfg",
    [
        {"rope_scaling": LLAMA3_SCALING},
        {"rope_scaling": {"type": "linear", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "llama3", **LLAMA3_SCALING, "rope_theta": 10000.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ],
)
def test_rope_scaling_changes_logits(pairs, rope_cfg):
    """A model that silently ignored the scaling (or the v5 layout) would equal the plain one."""
    plain, scaled = _same_weights_other_rope(pairs, rope_cfg)
    x = tokens(300, seed=11)
    assert mx.abs(plain(x) - scaled(x)).max().item() > 1e-2


def test_llama3_original_context_matters(pairs):
    ours, _ = pairs("llama", "classic")
    weights = dict(tree_flatten(ours.parameters()))
    other = dict(LLAMA3_SCALING, original_max_position_embeddings=8192)
    a = build_model(dict(CONFIGS["llama"], rope_scaling=LLAMA3_SCALING), weights)
    b = build_model(dict(CONFIGS["llama"], rope_scaling=other), weights)
    x = tokens(300, seed=12)
    assert mx.abs(a(x) - b(x)).max().item() > 1e-2


@pytest.mark.parametrize(
    "scaling",
    [None, LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 2.0},
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
     {"type": "longrope", "original_max_position_embeddings": 512,
      "short_factor": [1.0 + 0.1 * i for i in range(16)],
      "long_factor": [1.0 + 0.3 * i for i in range(16)]}],
)
def test_rope_tables_match_mlx_lm(scaling):
    from mlx_lm.models.rope_utils import initialize_rope

    from mlxgen.models.base import _rope_settings

    dims, base = 32, 10000.0
    _, norm_scaling, _, _ = _rope_settings({"rope_theta": base, "rope_scaling": scaling})
    ours = RoPE(dims, base, scaling=norm_scaling, max_position_embeddings=2048)
    ref = initialize_rope(dims, base, False, scaling, 2048)
    x = mx.random.normal((1, 2, 50, dims), key=mx.random.key(0))
    for offset in (0, 17, 1000):
        assert mx.abs(ours(x, offset) - ref(x, offset=offset)).max().item() <= 1e-4


def test_unsupported_rope_type():
    cfg = dict(CONFIGS["llama"], rope_scaling={"rope_type": "spiral", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="spiral.*supported: .*yarn"):
        model_from_config(cfg)


@pytest.mark.parametrize("scaling,missing", [
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 64,
      "short_factor": [1.0] * 8}, "long_factor"),
])
def test_incomplete_rope_scaling(scaling, missing):
    cfg = dict(CONFIGS["llama"], rope_scaling=scaling)
    with pytest.raises(UnsupportedModelError, match=missing):
        model_from_config(cfg)


# --- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "mamba", None])
def test_unsupported_model_type_names_supported_ones(model_type):
    cfg = dict(CONFIGS["llama"], model_type=model_type)
    if model_type is None:
        del cfg["model_type"]
    with pytest.raises(UnsupportedModelError) as e:
        model_from_config(cfg)
    msg = str(e.value)
    assert repr(model_type) in msg
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in msg


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"])
def test_missing_config_key(key):
    cfg = dict(CONFIGS["qwen3"])
    del cfg[key]
    with pytest.raises(ModelLoadError, match=key):
        model_from_config(cfg)


def test_inconsistent_heads():
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        model_from_config(dict(CONFIGS["llama"], num_key_value_heads=3))


def test_config_not_a_dict():
    with pytest.raises(ModelLoadError):
        model_from_config(["llama"])
