"""Gemma 2, Gemma 3 (text), Phi-3, Mistral with a sliding window, YaRN and LongRoPE against
transformers (float32, random weights, prompts longer than the window), and sliding-window
attention through every path: chunked prefill with chunks below and above the window, decode past
it, the bounded windowed cache, both cache modes, segment prompts with recompute, Session reuse."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed; no torch oracle")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from reuse_helpers import max_diff  # noqa: E402
from test_torch_oracle import to_mx, torch_logits  # noqa: E402

import mlxgen  # noqa: E402
from mlxgen.cache import KVCache  # noqa: E402
from mlxgen.errors import ModelLoadError  # noqa: E402
from mlxgen.loading import build_model  # noqa: E402
from mlxgen.models import model_from_config  # noqa: E402
from mlxgen.models.gemma import SoftcapAttention  # noqa: E402
from mlxgen.reuse import ChunkStore  # noqa: E402
from mlxgen.reuse.compose import Composition, Segment  # noqa: E402

TOL = 1e-4
VOCAB = 256
WINDOW = 32
IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
BASE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5,
            max_position_embeddings=2048, **IDS)
ALTERNATE = ["sliding_attention", "full_attention"] * 2
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}

CASES = {
    "mistral-window": dict(model_type="mistral", sliding_window=WINDOW, rope_theta=1e6),
    "gemma2": dict(model_type="gemma2", sliding_window=WINDOW, head_dim=32,
                   query_pre_attn_scalar=24),
    "gemma3": dict(model_type="gemma3_text", sliding_window=WINDOW, head_dim=32,
                   layer_types=ALTERNATE, rope_parameters=GEMMA3_ROPE),
    "phi3-window": dict(model_type="phi3", sliding_window=WINDOW),
    # Qwen2's optional windows: layers from max_window_layers on.
    "qwen2-window": dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW,
                         max_window_layers=2),
    # Phi-4-mini's shape of RoPE: partial rotary with LongRoPE (long factors past 64 tokens).
    "phi3-longrope": dict(model_type="phi3", original_max_position_embeddings=64,
                          max_position_embeddings=1024,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5,
                                           "short_factor": [1.0 + 0.1 * i for i in range(4)],
                                           "long_factor": [1.0 + 0.5 * i for i in range(4)]}),
    # Within its original context (max_position_embeddings == original): the short factors.
    "phi3-longrope-short": dict(model_type="phi3", original_max_position_embeddings=512,
                                max_position_embeddings=512,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                 "long_factor": [1.0 + 0.5 * i for i in range(8)]}),
    "qwen2-yarn": dict(model_type="qwen2", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "rope_theta": 1e6}),
}
# transformers picks LongRoPE's factors per forward pass by its length, mlxgen once per model (a
# cache holds keys rotated by one table): long factors where the configured context exceeds the
# original one. So phi3-longrope is compared past its original context only.
LENGTHS = {"phi3-longrope": (300,)}
WINDOWED = ("mistral-window", "gemma2", "gemma3", "phi3-window")


def hf_model(case: str, seed: int = 0, scale: float = 0.15):
    kw = dict(BASE, **CASES[case])
    model_type = kw.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    gemma = model_type.startswith("gemma")  # its norms scale by (1 + w): keep w near 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = scale * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(noise + (1.0 if name.endswith("norm.weight") and not gemma else 0.0))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = hf_model(case, seed=len(cache) + 1)
        return cache[case]

    return get


def ours(ref, config=None, weights=None, plain=False):
    config = ref.config.to_dict() if config is None else config
    weights = to_mx(ref.state_dict()) if weights is None else weights
    if not plain:
        return build_model(config, weights)  # the CPU backend is installed here
    model = model_from_config(config)
    model.load_weights(list(model.sanitize(weights).items()))
    return model


def compare(model, ref, record_diff, label, lengths=(7, 300)):
    rng = np.random.default_rng(0)
    for n in lengths:
        ids = rng.integers(0, VOCAB, size=(1, n))
        want = torch_logits(ref, ids)
        assert want.std() > 0.5  # non-trivial weights
        diff = record_diff(model(mx.array(ids)), mx.array(want), f"{label} L={n}")
        assert diff <= TOL, f"{label} L={n}: max abs diff {diff}"


@pytest.mark.parametrize("plain", [False, True], ids=["build_model", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(refs, record_diff, case, plain):
    compare(ours(refs(case), plain=plain), refs(case), record_diff, f"{case} plain={plain}",
            LENGTHS.get(case, (7, 300)))


def old_gemma3_layout(config: dict) -> dict:
    """The transformers 4 config.json of Gemma 3: top-level RoPE bases and a layer pattern."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 4.0})
    return old


def test_gemma3_config_layouts(refs, record_diff):
    """gemma3_text (both transformers layouts), and the multimodal gemma3 with a text_config
    whose checkpoint names the decoder language_model.model.* next to a vision tower."""
    ref = refs("gemma3")
    config, weights = ref.config.to_dict(), to_mx(ref.state_dict())
    compare(ours(ref, old_gemma3_layout(config)), ref, record_diff, "gemma3 v4 layout")
    multimodal = {"model_type": "gemma3", "text_config": old_gemma3_layout(config),
                  "vision_config": {"hidden_size": 8}}
    mm_weights = {k.replace("model.", "language_model.model.", 1): v for k, v in weights.items()}
    mm_weights["vision_tower.vision_model.embeddings.patch_embedding.weight"] = mx.zeros((8, 3))
    mm_weights["multi_modal_projector.mm_input_projection_weight"] = mx.zeros((8, 64))
    compare(ours(ref, multimodal, mm_weights), ref, record_diff, "gemma3 multimodal")
    v5_mm = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    compare(ours(ref, {"model_type": "gemma3", "text_config": config}, v5_mm), ref, record_diff,
            "gemma3 multimodal v5 names")


def test_qwen2_window_layers_in_both_layouts(refs):
    config = refs("qwen2-window").config.to_dict()
    assert config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    old = {k: v for k, v in config.items() if k != "layer_types"}
    for c in (config, old):
        assert model_from_config(c).args.layer_windows() == [None, None, WINDOW, WINDOW]


def test_gemma_layers(refs):
    g2, g3 = ours(refs("gemma2")), ours(refs("gemma3"))
    assert [layer.self_attn.window for layer in g2.layers] == [WINDOW, None] * 2
    # Soft-capped attention keeps its own attend under the CPU backend (no fused sdpa there).
    assert all(isinstance(layer.self_attn, SoftcapAttention) for layer in g2.layers)
    assert g2.runtime.backend == "cpu" and "sdpa" in vars(g2.layers[0].self_attn)
    # Gemma 3: local layers rotate with their own base, global ones with the (scaled) global one.
    local, glob = g3.layers[0].self_attn.rope, g3.layers[1].self_attn.rope
    assert (local.base, local.scale) == (10000.0, 1.0) and (glob.base, glob.scale) == (1e6, 0.25)


def test_window_is_what_changes_mistral(refs):
    """The window matters past it: without it the logits differ (this test could fail)."""
    ref = refs("mistral-window")
    config = dict(ref.config.to_dict(), sliding_window=None)
    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(1, 100)))
    full = ours(ref, config)(ids)
    windowed = ours(ref)(ids)
    assert max_diff(windowed[:, :WINDOW], full[:, :WINDOW]) < TOL
    assert max_diff(windowed[:, WINDOW + 8 :], full[:, WINDOW + 8 :]) > 1e-2


def cached_logits(model, ids, mode, chunk):
    """Every position's logits from chunked prefill, then decoding one token at a time."""
    cache = model.make_cache(mode)
    split = len(ids) - 20
    out = [model(mx.array(ids[s : min(s + chunk, split)])[None], cache)[0]
           for s in range(0, split, chunk)]
    out += [model(mx.array([t])[None], cache)[0] for t in ids[split:]]
    return mx.concatenate(out), cache


@pytest.fixture(params=[256, 8], ids=["step256", "step8"])
def step(request, monkeypatch):
    """The default eviction step, and a small one that evicts several times in these prompts."""
    monkeypatch.setattr(KVCache, "step", request.param)
    return request.param


@pytest.mark.parametrize("mode", ["standard", "pre-rope"])
@pytest.mark.parametrize("case", WINDOWED)
def test_chunked_prefill_and_decode_past_window(refs, case, mode, step):
    model = ours(refs(case))
    ids = np.random.default_rng(1).integers(0, VOCAB, size=330).tolist()
    full = model(mx.array(ids)[None])[0]
    for chunk in (13, WINDOW, 48, 400):
        got, cache = cached_logits(model, ids, mode, chunk)
        assert max_diff(got, full) < TOL, f"chunk {chunk}"
        for c, layer in zip(cache, model.layers):
            assert c.offset == len(ids) and c.window == layer.self_attn.window
            if c.window is not None:  # bounded: what the window sees, a step, a chunk
                held = c.offset - c.start
                assert held <= WINDOW + step + min(chunk, len(ids))
                assert c.keys.shape[2] <= held + step
                if step == 8:
                    assert c.start > 0


def test_windowed_cache_memory_at_8k():
    """A Mistral-shaped window of 4096 at 8192 tokens: half the keys of a full cache (or less)."""
    window = 4096
    model = model_from_config(dict(BASE, model_type="mistral", sliding_window=window,
                                   num_hidden_layers=1))
    windowed, full = model.make_cache(), model.make_cache(keep_all=True)
    kv = mx.zeros((1, 2, 512, 16))
    for _ in range(8192 // 512):
        for c in (windowed[0], full[0]):
            c.drop_unseen()
            c.update_and_fetch(kv, kv)
    windowed[0].drop_unseen()  # what the next step does first
    w, f = windowed[0], full[0]
    assert f.offset == w.offset == 8192 and f.start == 0
    assert w.offset - w.start <= window + KVCache.step
    assert w.keys.nbytes + w.values.nbytes <= (f.keys.nbytes + f.values.nbytes) * 0.6


@pytest.mark.parametrize("mode", ["standard", "pre-rope"])
@pytest.mark.parametrize("case", ["gemma3", "mistral-window"])
def test_full_recompute_equals_full_prefill(refs, case, mode, step):
    model = ours(refs(case))
    ids = np.random.default_rng(2).integers(0, VOCAB, size=140).tolist()
    store = ChunkStore(model, None)
    # A long prefix (evicted from the windowed layers), chunks longer than the window.
    segments = [Segment(ids[:50]), Segment(ids[50:90], store.add(ids[50:90])),
                Segment(ids[90:94]), Segment(ids[94:130], store.add(ids[94:130])),
                Segment(ids[130:])]
    want = model(mx.array(ids)[None])[:, -1]
    for strategy in ("first", "deviation", "mixed"):
        composition = Composition(segments, ids)
        _, logits = composition.run(model, cache_mode=mode, recompute=1.0,
                                    recompute_strategy=strategy, prefill_chunk_size=7)
        assert composition.cached_tokens == 0
        assert max_diff(logits, want) < TOL


@pytest.mark.parametrize("mode", ["standard", "pre-rope"])
def test_chunk_beyond_every_window_is_not_seen(refs, mode):
    """With every layer windowed, a stored chunk (not recomputed) further back than
    layers x window cannot reach the last token: its logits equal the full prefill's."""
    model = ours(refs("mistral-window"))
    ids = np.random.default_rng(3).integers(0, VOCAB, size=200).tolist()
    store = ChunkStore(model, None)
    segments = [Segment(ids[:10]), Segment(ids[10:50], store.add(ids[10:50])),
                Segment(ids[50:])]
    composition = Composition(segments, ids)
    _, logits = composition.run(model, cache_mode=mode, recompute=0.0)
    assert composition.cached_tokens == 40
    assert max_diff(logits, model(mx.array(ids)[None])[:, -1]) < TOL
    # ...whereas text right after the chunk still sees it as stored (encoded alone).
    short = Composition(segments[:2] + [Segment(ids[50:60])], ids[:60])
    _, logits = short.run(model, cache_mode=mode, recompute=0.0)
    assert max_diff(logits, model(mx.array(ids[:60])[None])[:, -1]) > 1e-3


@pytest.mark.parametrize("case", ["gemma2", "mistral-window"])
def test_session_reuse_past_the_window(refs, case, step):
    from test_generate import TEMPLATE, tiny_tokenizer

    model = ours(refs(case))
    tok = mlxgen.Tokenizer(tiny_tokenizer(), chat_template=TEMPLATE)
    vocab = min(tok.vocab_size, VOCAB)
    rng = np.random.default_rng(4)
    first = rng.integers(3, vocab, size=120).tolist()

    def fresh(prompt):
        return [r.token for r in mlxgen.stream_generate(model, tok, prompt, max_tokens=6)]

    session = mlxgen.Session(model, tok)
    reply = [r.token for r in session.stream_generate(first, max_tokens=6)]
    assert reply == fresh(first)
    # Continue the conversation past the window: the prefix is reused, the reply is exact.
    second = first + reply + rng.integers(3, vocab, size=40).tolist()
    reply2 = [r.token for r in session.stream_generate(second, max_tokens=6)]
    assert reply2 == fresh(second)
    assert session.stats.cached_tokens > 0
    # Diverge early: windowed layers forgot what the short prefix needs; still exact.
    third = first[:20] + rng.integers(3, vocab, size=30).tolist()
    assert [r.token for r in session.stream_generate(third, max_tokens=6)] == fresh(third)
    assert all(c.offset == session.cache[0].offset for c in session.cache)


# --- bad configs ----------------------------------------------------------------------------


def test_sliding_layers_without_a_window():
    cfg = dict(BASE, model_type="gemma3_text", layer_types=ALTERNATE, sliding_window=None)
    with pytest.raises(ModelLoadError, match="sliding_window is None"):
        model_from_config(cfg)
    with pytest.raises(ModelLoadError, match="sliding_window is 0"):
        model_from_config(dict(BASE, model_type="gemma2", sliding_window=0))


def test_bad_layer_types_and_gemma3_without_text_config():
    with pytest.raises(ModelLoadError, match="layer_types"):
        model_from_config(dict(BASE, model_type="gemma2", sliding_window=8,
                               layer_types=["sliding_attention"]))
    with pytest.raises(ModelLoadError, match="text_config"):
        model_from_config(dict(BASE, model_type="gemma3"))


def test_phi3_longrope_factor_count():
    cfg = dict(CASES["phi3-longrope"], **BASE)
    cfg["max_position_embeddings"] = 1024
    cfg["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}
    cfg["original_max_position_embeddings"] = 64
    cfg.pop("rope_parameters")
    cfg["partial_rotary_factor"] = 0.5
    with pytest.raises(mlxgen.errors.UnsupportedModelError, match="3 entries.*needs 4"):
        model_from_config(cfg)


def test_info_shows_window_and_rope_scaling(refs):
    from mlxgen.info import rope_summary, window_summary

    g3 = ours(refs("gemma3")).args
    assert window_summary(g3) == f"{WINDOW} tokens on 2 of 4 layers"
    assert rope_summary(g3) == "theta=1e+06, linear scaling x4; sliding layers theta=10000"
    phi = ours(refs("phi3-longrope")).args
    assert rope_summary(phi) == ("theta=10000, longrope scaling (original context 64), "
                                 "rotary on 0.5 of each head")
    assert window_summary(phi).startswith("none")
    yarn = ours(refs("qwen2-yarn")).args
    assert rope_summary(yarn) == "theta=1e+06, yarn scaling x4 (original context 64)"


# --- GGUF: gemma2 / gemma3 architectures, YaRN keys ---------------------------------------------

SPM_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["\u2581", "t", "h", "e", "\u2581t", "he", "\u2581the", "  ", "   ",
                 "<start_of_turn>", "<end_of_turn>"])
SPM_TYPES = [3, 3, 3, 2] + [6] * 256 + [1] * 9 + [3, 3]
_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gemma_gguf(path, ref, arch: str, ollama: bool = False) -> None:
    """Write a transformers Gemma as llama.cpp's converter does: norms stored as 1 + w (ollama:
    as Ollama's converter names Gemma 3's two RoPE bases, with vision tensors in the file)."""
    from gguf import GGUFWriter

    c = ref.config
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
    if arch == "gemma2":
        w.add_float32(f"{arch}.rope.freq_base", 10000.0)
        w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    elif ollama:
        w.add_float32(f"{arch}.rope.global.freq_base", 1e6)
        w.add_float32(f"{arch}.rope.local.freq_base", 10000.0)
        w.add_tensor("v.patch_embd.weight", np.zeros((4, 3), np.float32))
        w.add_tensor("mm.mm_input_projection.weight", np.zeros((4, 4), np.float32))
    else:
        w.add_float32(f"{arch}.rope.freq_base", 1e6)
    if arch == "gemma3":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", 4.0)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", SPM_TOKENS)
    w.add_array("tokenizer.ggml.token_type", SPM_TYPES)
    w.add_array("tokenizer.ggml.scores", [0.0] * len(SPM_TOKENS))
    w.add_uint32("tokenizer.ggml.bos_token_id", 2)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    for name, t in ref.state_dict().items():
        a = t.detach().float().numpy()
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("norm.weight"):
            a = a + 1.0
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gname = f"blk.{i}.{_GGUF_NAMES[module]}.weight"
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    # llama.cpp's semantics: attention scale head_dim^-1/2, gemma3's 1-in-6 global layers,
    # local base 10000, linear scaling on the global layers.
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=6, sliding_window=16, head_dim=32,
                   query_pre_attn_scalar=32, sliding_window_pattern=6,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1e6}}),
    "gemma2": dict(model_type="gemma2", sliding_window=16, head_dim=32, query_pre_attn_scalar=32),
}


@pytest.mark.parametrize("arch", list(GGUF_CASES) + ["gemma3-ollama"])
def test_gemma_gguf_matches_transformers(tmp_path, record_diff, arch):
    arch, _, ollama = arch.partition("-")
    kw = dict(BASE, vocab_size=len(SPM_TOKENS), **GGUF_CASES[arch])
    model_type = kw.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                        dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    ref.eval()
    path = tmp_path / f"{arch}.gguf"
    write_gemma_gguf(path, ref, arch, ollama=bool(ollama))
    model, tok = mlxgen.load(str(path))
    assert model.args.model_type == model_type and model.args.sliding_window == 16
    if arch == "gemma3":
        assert (model.args.rope_theta, model.args.rope_local_base_freq) == (1e6, 10000.0)
    assert model.args.layer_windows() == [None if t == "full_attention" else 16
                                          for t in ref.config.layer_types]
    rng = np.random.default_rng(0)
    for n in (7, 100):
        ids = rng.integers(0, len(SPM_TOKENS), size=(1, n))
        want = torch_logits(ref, ids)
        diff = record_diff(model(mx.array(ids)), mx.array(want), f"{arch} gguf L={n}")
        assert diff <= TOL, f"{arch} gguf L={n}: {diff}"
    # SentencePiece without a space prefix; "x" is not a piece: byte fallback.
    assert tok.encode("the", add_special_tokens=False) == [SPM_TOKENS.index(t) for t in ("t", "he")]
    assert tok.encode("x", add_special_tokens=False) == [4 + ord("x")]
    assert tok.encode(" the", add_special_tokens=False) == [SPM_TOKENS.index("\u2581the")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.encode("a   b", add_special_tokens=False)[1] == SPM_TOKENS.index("   ")
    for text in ("the the", " the", "héllo 👋 <end_of_turn> x=1", "if x:\n    return  the"):
        assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False), text


def test_yarn_from_gguf_keys(tmp_path):
    from gguf_fixtures import write_synthetic

    from mlxgen.loading.gguf import read_gguf

    meta = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 64}
    path = write_synthetic(tmp_path / "y.gguf", "qwen2", qkv_bias=True, extra_meta=meta).path
    contents = read_gguf(path)
    assert contents.config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64}
    model, _ = mlxgen.load(str(path))
    rope = model.layers[0].self_attn.rope
    hf_like = model_from_config(dict(contents.config, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
    want = hf_like.layers[0].self_attn.rope
    assert rope.mscale == pytest.approx(0.1 * np.log(4.0) + 1)
    assert mx.allclose(rope.inverse_frequencies(), want.inverse_frequencies()).item()


def write_phi3_gguf(path, ref, q8_fused: bool = False) -> None:
    """A transformers Phi-3 as llama.cpp writes it: fused attn_qkv and ffn_up (gate, up),
    LongRoPE factors as tensors, the rotary share as rope.dimension_count."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    c = ref.config
    rp = c.rope_parameters
    head_dim = c.hidden_size // c.num_attention_heads
    w = GGUFWriter(str(path), "phi3")
    for key, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads),
                       ("rope.dimension_count", int(head_dim * rp["partial_rotary_factor"])),
                       ("rope.scaling.original_context_length", rp["original_max_position_embeddings"]),
                       ("attention.sliding_window", c.sliding_window)):
        w.add_uint32(f"phi3.{key}", value)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32("phi3.rope.freq_base", rp["rope_theta"])
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", SPM_TOKENS)
    w.add_array("tokenizer.ggml.token_type", SPM_TYPES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 2)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_tensor("rope_factors_long.weight", np.array(rp["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rp["short_factor"], np.float32))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    for name, t in ref.state_dict().items():
        a = np.ascontiguousarray(t.detach().float().numpy())
        if name in glob:
            w.add_tensor(glob[name], a)
            continue
        _, _, i, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        # q8_fused: fused tensors Q8_0, the other projections Q4_0 (the file's default then)
        qtype = {"self_attn.qkv_proj": GGMLQuantizationType.Q8_0,
                 "mlp.gate_up_proj": GGMLQuantizationType.Q8_0,
                 "self_attn.o_proj": GGMLQuantizationType.Q4_0,
                 "mlp.down_proj": GGMLQuantizationType.Q4_0}.get(module) if q8_fused else None
        if qtype is not None:
            w.add_tensor(f"blk.{i}.{names[module]}.weight", quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(f"blk.{i}.{names[module]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_phi3_gguf_matches_transformers(tmp_path, record_diff, monkeypatch):
    kw = dict(BASE, vocab_size=len(SPM_TOKENS), **CASES["phi3-longrope"], sliding_window=WINDOW)
    kw.pop("model_type")
    config = transformers.AutoConfig.for_model("phi3", **kw)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                        dtype=torch.float32)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0.0))
    ref.eval()
    write_phi3_gguf(tmp_path / "phi3.gguf", ref)
    model, _ = mlxgen.load(str(tmp_path / "phi3.gguf"))
    a = model.args
    assert (a.partial_rotary_factor, a.sliding_window, a.rope_scaling["rope_type"]) == (0.5, WINDOW, "longrope")
    ids = np.random.default_rng(0).integers(0, len(SPM_TOKENS), size=(1, 100))  # past 64: long factors
    want = mx.array(torch_logits(ref, ids))
    assert record_diff(model(mx.array(ids)), want, "phi3 gguf L=100") <= TOL
    # Quantized fused projections: the split q/k/v and gate/up keep the file's 8 bits.
    write_phi3_gguf(tmp_path / "phi3-q8.gguf", ref, q8_fused=True)
    monkeypatch.setenv("MLXGEN_QUANTIZED", "keep")
    from mlxgen.loading.gguf import read_gguf

    q = read_gguf(tmp_path / "phi3-q8.gguf").quantization
    assert q["bits"] == 4  # the most common setting, which the split q/k/v, gate/up must not take
    assert q["model.layers.0.self_attn.k_proj"] == q["model.layers.0.mlp.up_proj"] == {"group_size": 32, "bits": 8}
    model, _ = mlxgen.load(str(tmp_path / "phi3-q8.gguf"))
    assert "scales" in model.layers[0].self_attn.k_proj  # kept quantized, split
    deq = read_gguf(tmp_path / "phi3-q8.gguf", dequantize=True)
    same_values = build_model(deq.config, deq.weights)
    assert max_diff(model(mx.array(ids)), same_values(mx.array(ids))) < TOL


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3-longrope"])
def test_float16_mac_profile_runs_close(refs, case):
    """float16 (what a Mac runs; MLX's own ops here): the same model within float16 noise."""
    ref = refs(case)
    f32 = ours(ref)
    f16 = build_model(ref.config.to_dict(), to_mx(ref.state_dict()), dtype="float16")
    assert f16.model.norm.weight.dtype == mx.float16
    ids = mx.array(np.random.default_rng(5).integers(0, VOCAB, size=(1, 80)))
    cache = f16.make_cache()
    got = mx.concatenate([f16(ids[:, :50], cache), f16(ids[:, 50:], cache)], axis=1)
    assert got.dtype == mx.float16 and max_diff(got, f32(ids)) < 1e-2


def test_cache_without_the_layers_window_is_refused(refs):
    from mlxgen.cache import make_cache
    from mlxgen.errors import ConfigError

    model = ours(refs("gemma3"))
    with pytest.raises(ConfigError, match="sliding window of 32 tokens.*model.make_cache"):
        model(mx.array([[1, 2, 3]]), make_cache(len(model.layers)))


def test_phi3_v4_layout_with_su_scaling(refs, record_diff):
    """Phi-3's original config.json: rope_scaling {"type": "su"}, with the original context and
    the rotary share at the top level."""
    ref = refs("phi3-longrope")
    config = ref.config.to_dict()
    rp = config.pop("rope_parameters")
    config.update(rope_theta=rp["rope_theta"], partial_rotary_factor=rp["partial_rotary_factor"],
                  original_max_position_embeddings=rp["original_max_position_embeddings"],
                  rope_scaling={"type": "su", "short_factor": rp["short_factor"],
                                "long_factor": rp["long_factor"]})
    compare(ours(ref, config), ref, record_diff, "phi3 su v4 layout", (300,))
