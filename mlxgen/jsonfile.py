"""Model JSON files (config.json, tokenizer_config.json, shard indexes) read with bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

MAX_JSON_BYTES = 64 << 20  # far above any real model's JSON file


def read_json(file: Path) -> Any:
    """A JSON file of bounded size and nesting, or ModelLoadError naming it."""
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{file} is {size} bytes, more than the {MAX_JSON_BYTES} a model's "
                             "JSON file can need; it is not a model file.")
    try:
        return json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({e}); re-download the model.") from None
    except RecursionError:
        raise ModelLoadError(f"{file} nests JSON too deeply to be a model file.") from None
