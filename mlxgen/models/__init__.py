"""Model registry: model_type -> class, and construction from config + weights."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import SUPPORTED_MODEL_TYPES, ModelArgs

# model_type -> (module, class): a family's module is imported when a model of it is built, so
# loading one family never imports the others.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "Model"),
    "mistral": ("llama", "Model"),
    "qwen2": ("llama", "Model"),
    "qwen3": ("llama", "Model"),
    "qwen3_moe": ("qwen3_moe", "Model"),
    "phi3": ("llama", "Model"),  # fused projections split at load (llama.Model.sanitize)
    "gemma2": ("gemma", "Model"),
    "gemma3_text": ("gemma", "Model"),
    "gemma3": ("gemma", "Model"),  # multimodal layout: its text_config (ModelArgs.from_config)
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES)

if TYPE_CHECKING:
    from .llama import Model


def model_class(model_type: str) -> type:
    """The class that builds a model of `model_type` (one of SUPPORTED_MODEL_TYPES)."""
    module, name = MODEL_CLASSES[model_type]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def model_from_config(config: dict) -> Model:
    """An uninitialised model (random weights) for a config.json dict."""
    args = ModelArgs.from_config(config)
    return model_class(args.model_type)(args)


__all__ = ["ModelArgs", "MODEL_CLASSES", "SUPPORTED_MODEL_TYPES", "model_class", "model_from_config"]
