"""The TTFT harness without servers: statistics, fairness rules, in-process targets, reports, CLI
and the notebook (executed with nbclient so it cannot rot)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxgen.bench import stats
from mlxgen.bench.prompts import build_prompt, new_nonce, prompts_are_unique, special_token_count
from mlxgen.bench.stats import Sample, count_mismatch, schedule, summarize
from mlxgen.bench.tiny import write_tiny_llama
from mlxgen.bench.ttft import BenchConfig, run
from mlxgen.errors import MlxgenError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import mlxgen

    return mlxgen.load(str(tiny_dir))


def quick(**kw) -> BenchConfig:
    base = dict(lengths=[48, 96], reps=2, warmup=1, measure_peak=False, progress=False, settle_s=0)
    return BenchConfig(**{**base, **kw})


# -- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("xs", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(range(17))])
def test_percentiles_match_numpy(xs):
    for q in (0, 10, 50, 90, 100):
        assert stats.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert stats.median(xs) == pytest.approx(np.median(xs))
    assert stats.p90(xs) == pytest.approx(np.percentile(xs, 90))


def test_percentile_of_nothing_is_nan():
    assert stats.median([]) != stats.median([])


def test_count_mismatch_flags_over_two_percent():
    assert not count_mismatch(100, 100)
    assert not count_mismatch(100, 102) and not count_mismatch(100, 98)
    assert count_mismatch(100, 103) and count_mismatch(100, 97)
    assert count_mismatch(512, 400)
    assert not count_mismatch(100, None)  # unknown: not flagged


def test_schedule_interleaves_and_rotates():
    plan = schedule(["a", "b", "c"], reps=4, warmup=1)
    assert len(plan) == 15
    rounds = [plan[i:i + 3] for i in range(0, 15, 3)]
    for r, rnd in enumerate(rounds):
        assert sorted(name for name, _, _ in rnd) == ["a", "b", "c"]  # every target each round
        assert {rep for _, rep, _ in rnd} == {r - 1}
        assert all(warm == (r == 0) for _, _, warm in rnd)
    firsts = [rnd[0][0] for rnd in rounds]
    assert firsts == ["a", "b", "c", "a", "b"]  # nobody always goes first
    assert schedule(["x"], reps=2, warmup=0) == [("x", 0, False), ("x", 1, False)]


def _sample(target, length, rep, ttft=None, ours=100, server=None, error=None):
    return Sample(target, length, rep, error is None, ours, ttft_s=ttft,
                  server_prompt_tokens=server, error=error)


def test_summarize_excludes_warmups_and_flags_mismatch():
    samples = [
        _sample("a", 100, -1, ttft=50.0),  # warm-up: ignored
        _sample("a", 100, 0, ttft=1.0), _sample("a", 100, 1, ttft=3.0), _sample("a", 100, 2, ttft=2.0),
        _sample("b", 100, -1, error="boom"),
        _sample("b", 100, 0, ttft=4.0, server=110), _sample("b", 100, 1, error="cut"),
    ]
    rows = summarize(samples, flops_of=lambda n: 1e9 * n)
    a, b = rows
    assert (a.target, a.n, a.failed, a.median_s, a.mismatch) == ("a", 3, 0, 2.0, False)
    assert a.p90_s == pytest.approx(2.8)
    assert a.gflops == pytest.approx(100 / 2.0)
    assert (b.target, b.n, b.failed, b.server_prompt_tokens, b.mismatch) == ("b", 1, 1, 110, True)
    assert b.errors == ["cut"]


def test_prefill_flops_formula():
    from mlxgen.models.base import ModelArgs

    args = ModelArgs("llama", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=10, intermediate_size=16, num_key_value_heads=1)
    per_layer = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16  # q,o: 8x8; k,v: 8x4; mlp: 3 x 8x16
    assert stats.matmul_params(args) == 2 * per_layer
    n = 10
    assert stats.prefill_flops(args, n) == 2 * 2 * per_layer * n + 2 * n * n * 2 * 2 * 4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_mlx_lm_runs_the_same_weights(model_type):
    import mlx.core as mx

    from mlxgen.bench.targets import mlx_lm_model
    from mlxgen.models import model_from_config

    config = dict(model_type=model_type, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                  intermediate_size=48, max_position_embeddings=256, tie_word_embeddings=False)
    if model_type == "qwen3_moe":
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    ours = model_from_config(config)
    theirs = mlx_lm_model(ours)  # MoE: experts -> switch_mlp
    x = mx.array([[1, 5, 2, 7, 3]])
    assert mx.abs(ours(x) - theirs(x)).max().item() < 1e-5


# -- prompts ------------------------------------------------------------------------------------

def test_prompts_have_exact_lengths_and_unique_starts(tiny):
    _, tok = tiny
    for n in (32, 33, 100, 257, 1000):
        p = build_prompt(tok, n)
        assert p.tokens == n == len(tok.encode(p.text))
        assert p.text.startswith(p.nonce)
    prompts = [build_prompt(tok, 64) for _ in range(40)]
    # The tiny tokenizer spends about one token per hex digit of the nonce: 4 ids (BOS + 3 digits)
    # collide among 40 prompts in ~1% of runs; 8 ids hold 28 random bits.
    assert prompts_are_unique(prompts, prefix_tokens=8)
    assert len({p.nonce for p in prompts}) == 40
    same = build_prompt(tok, 64, nonce="fixed: ")
    assert not prompts_are_unique([same, build_prompt(tok, 64, nonce="fixed: ")])
    assert new_nonce() != new_nonce()
    assert special_token_count(tok) == 0
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tok, 3)


# -- in-process runs, reports, CLI --------------------------------------------------------------

def test_run_in_process_targets(tiny_dir):
    result = run(quick(model=str(tiny_dir), chunk_sizes=[16, 512]))
    names = ["mlxgen[chunk=16]", "mlxgen[chunk=512]", "mlx-lm"]
    assert [r.target for r in result.rows] == names * 2
    assert all(r.n == 2 and r.failed == 0 and r.median_s > 0 for r in result.rows)
    assert [r.prompt_tokens for r in result.rows] == [48] * 3 + [96] * 3
    assert len(result.samples) == 2 * 3 * 3 and not result.failures
    assert len({s.nonce for s in result.samples}) == len(result.samples)  # every request unique
    assert all(s.cached_tokens in (0, None) for s in result.samples)
    first_round = [s.target for s in result.samples[:3]]
    assert sorted(first_round) == sorted(names) and all(s.warmup for s in result.samples[:3])
    loads = {t["name"]: t["load_s"] for t in result.targets}
    assert all(v is not None and v >= 0 for v in loads.values())
    text = result.markdown()
    assert "| mlx-lm | 96 |" in text and "model load s" in text


def test_cold_column_times_a_fresh_mlxgen_process(tiny_dir):
    result = run(quick(model=str(tiny_dir), lengths=[48], reps=1, warmup=0, cold=True))
    assert set(result.cold) == {"mlxgen"}  # mlx-lm builds from mlxgen's weights: no cold start
    warm = next(r.median_s for r in result.rows if r.target == "mlxgen")
    assert result.cold["mlxgen"][48] > warm  # import + load come on top of the prefill
    text = result.markdown()
    head = next(line for line in text.splitlines() if line.startswith("| target |"))
    row = next(line for line in text.splitlines() if line.startswith("| mlx-lm | 48 |"))
    column = head.split(" | ").index("cold TTFT ms")
    assert row.split(" | ")[column] == "-"
    assert result.record()["cold_ttft_s"] == {"mlxgen": {48: result.cold["mlxgen"][48]}}


def test_every_run_waits_for_the_machine_to_settle(tiny_dir, monkeypatch):
    from mlxgen.bench import ttft

    pauses = []
    monkeypatch.setattr(ttft.time, "sleep", pauses.append)
    result = run(quick(model=str(tiny_dir), lengths=[40], settle_s=0.25))
    assert len(result.samples) == 2 * 3 and pauses == [0.25] * 6  # warm-ups included
    for bad in (-1.0, float("nan"), 600.0):
        with pytest.raises(MlxgenError, match="--settle"):
            run(quick(model=str(tiny_dir), settle_s=bad))


def test_failing_target_is_reported_and_others_kept(tmp_path):
    # A 64-token context: mlxgen refuses 96-token prompts, mlx-lm (no such check) runs them.
    short = write_tiny_llama(tmp_path / "short", context=64)
    result = run(quick(model=str(short), max_failures=2))
    rows = {(r.target, r.length): r for r in result.rows}
    assert rows[("mlxgen", 48)].n == 2 and rows[("mlx-lm", 96)].n == 2
    assert rows[("mlxgen", 96)].n == 0
    assert "PromptTooLongError" in result.failures["mlxgen"]
    assert "2 failures in a row" in result.failures["mlxgen"]
    assert "Failures:" in result.markdown() and "mlxgen: dropped at 96 tokens" in result.markdown()


def test_cli_writes_json_and_plot(tiny_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mlxgen.cli import main

    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", "ttft", "--model", str(tiny_dir), "--lengths", "40,80", "--reps", "2",
                 "--targets", "mlxgen", "--json", str(out_json), "--plot", str(out_png),
                 "--no-progress", "--settle", "0"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| mlxgen | 40 |" in table and "GFLOP/s" in table and "% of matmul peak" in table
    record = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    for key in ("machine", "backend", "versions", "samples", "summary", "matmul_peak_gflops"):
        assert key in record
    assert record["versions"]["mlx"] and record["versions"]["mlx-lm"]
    assert len(record["samples"]) == 2 * 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(tiny_dir, monkeypatch, capsys):
    from mlxgen.cli import main

    assert main(["bench", "ttft", "--model", str(tiny_dir), "--targets", "vllm"]) == 2
    assert "unknown in-process target" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["bench", "ttft", "--plot", "x.png"]) == 2
    assert "pip install 'mlxgen[bench]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "ttft", "--lengths", "0,12"])


def test_script_entry_point():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ttft.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--chunk-sizes" in proc.stdout


def test_notebook_executes(tiny_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "ttft.ipynb", as_version=4)
    env = {"MLXGEN_TTFT_MODEL": str(tiny_dir), "MLXGEN_TTFT_LENGTHS": "40,80",
           "MLXGEN_TTFT_REPS": "2", "MLXGEN_TTFT_OLLAMA": "none", "MLXGEN_TTFT_OUT": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = json.dumps(outputs)
    assert "| mlxgen |" in text and "| mlx-lm |" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
