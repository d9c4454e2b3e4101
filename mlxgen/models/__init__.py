"""Model registry: model_type -> class, and construction from config + weights."""

from __future__ import annotations

from . import gemma, llama, qwen3_moe
from .base import SUPPORTED_MODEL_TYPES, ModelArgs

MODEL_CLASSES: dict[str, type[llama.Model]] = {
    "llama": llama.Model,
    "mistral": llama.Model,
    "qwen2": llama.Model,
    "qwen3": llama.Model,
    "qwen3_moe": qwen3_moe.Model,
    "phi3": llama.Model,  # fused projections split at load (llama.Model.sanitize)
    "gemma2": gemma.Model,
    "gemma3_text": gemma.Model,
    "gemma3": gemma.Model,  # multimodal layout: its text_config (ModelArgs.from_config)
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES)


def model_from_config(config: dict) -> llama.Model:
    """An uninitialised model (random weights) for a config.json dict."""
    args = ModelArgs.from_config(config)
    return MODEL_CLASSES[args.model_type](args)


__all__ = ["ModelArgs", "MODEL_CLASSES", "SUPPORTED_MODEL_TYPES", "model_from_config"]
