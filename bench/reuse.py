"""K/V reuse benchmark: RAG chunks reused across questions, chat sessions; cold vs reused.

Same as `mlxgen bench reuse`; run `python bench/reuse.py --help` for the options."""

import sys

from mlxgen.bench.reuse import main

if __name__ == "__main__":
    sys.exit(main())
