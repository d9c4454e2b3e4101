"""Swapping a model's layers for a backend's subclasses of them, and back.

A backend subclass changes only how a layer computes (no new weights), so swapping is a class
change: parameters, quantization and shapes stay as loaded."""

from __future__ import annotations

import mlx.nn as nn

# Instance attributes a backend may install (an op a plain layer calls through, e.g. sdpa).
PLUGS = ("sdpa", "activation", "dispatch")
_BASES: dict[type, type] = {}  # backend subclass -> the plain MLX class it replaces


def swap(model: nn.Module, mapping: dict[type, type]) -> None:
    """Replace every module whose exact class is a key of `mapping` by the mapped subclass."""
    for base, sub in mapping.items():
        _BASES[sub] = base
    for _, module in model.named_modules():
        sub = mapping.get(type(module))
        if sub is not None:
            module.__class__ = sub


def plug(model: nn.Module, owner: type, name: str, value) -> None:
    """Set the op `name` (one of PLUGS) on every module of class `owner` (or a subclass)."""
    assert name in PLUGS, name
    for _, module in model.named_modules():
        if isinstance(module, owner):
            setattr(module, name, value)


def reset(model: nn.Module) -> None:
    """Undo every swap and plug: the model is plain MLX again."""
    for _, module in model.named_modules():
        while type(module) in _BASES:
            module.__class__ = _BASES[type(module)]
        for name in PLUGS:
            module.__dict__.pop(name, None)
