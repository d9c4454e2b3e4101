"""Hugging Face model directories: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import ModelLoadError, UnsupportedModelError
from ..jsonfile import read_json
from .limits import check_config


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise ModelLoadError(
            f"{path} has no config.json; point mlxgen at a Hugging Face model directory, a .gguf "
            "file, a repo id or ollama:NAME."
        )
    config = read_json(file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} must hold a JSON object; re-download the model.")
    check_config(config, str(file))
    return config


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = read_json(index)["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
            if any(f.parent != path for f in files):
                raise ValueError("a shard name leaves the model directory")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ModelLoadError(f"{index} is malformed ({e}); re-download the model.") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(
                f"{path} is missing weight shards {missing} listed in {index.name}; the download "
                "is incomplete. Re-download the model."
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights; re-download the model.")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX reports truncation/corruption as a bare runtime error
            raise ModelLoadError(
                f"cannot read {file} ({e}); the file is truncated or corrupt. Re-download it."
            ) from None
    return weights


def quantization_of(config: dict) -> dict | None:
    """MLX-quantized checkpoints (mlx-community) carry {"group_size", "bits", ...per-layer}."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    if q.get("quant_method"):  # transformers-side quantization: GPTQ, AWQ, FP8, bitsandbytes...
        raise UnsupportedModelError(
            f"{q['quant_method']}-quantized checkpoints are not supported; use the original "
            "(unquantized) model or an MLX-quantized one (e.g. from mlx-community)."
        )
    modes = {q.get("mode") or "affine"} | {
        v.get("mode") or "affine" for v in q.values() if isinstance(v, dict)
    }
    if modes != {"affine"}:
        raise UnsupportedModelError(
            f"MLX quantization mode(s) {sorted(modes - {'affine'})} are not supported; only "
            "'affine' (mlx-community's usual 4/8-bit) is."
        )
    if "bits" in q and "group_size" in q:
        return q
    return None
