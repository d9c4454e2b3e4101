"""Time to first token: mlxgen vs mlx-lm vs Ollama / OpenAI-compatible servers.

Same as `mlxgen bench ttft`; run `python bench/ttft.py --help` for the options."""

import sys

from mlxgen.bench.ttft import main

if __name__ == "__main__":
    sys.exit(main())
