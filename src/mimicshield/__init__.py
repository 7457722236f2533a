"""mimicshield: protect images against diffusion-based mimicry (Xue et al., ICLR 2024).

The public names load lazily (PEP 562), so ``import mimicshield`` and ``mimicshield --help`` do
not import torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# First: sets PYTORCH_ENABLE_MPS_FALLBACK on macOS, which torch only reads while it loads.
from . import mps  # noqa: F401
from .defaults import DEFAULT_METHOD, DEFAULT_MODEL

__version__ = "0.1.0"

_LAZY = {
    "CATEGORY_PROMPTS": "protector",
    "Conditioning": "models",
    "Ensemble": "ensemble",
    "LatentDiffusion": "models",
    "METHODS": "methods",
    "Method": "methods",
    "ModelLoadError": "models",
    "ProtectionConfig": "protector",
    "ProtectionOutput": "protector",
    "Protector": "protector",
    "UnsupportedModelError": "models",
    "StepInputs": "methods",
    "get_method": "methods",
    "load_models": "models",
}

__all__ = [
    "CATEGORY_PROMPTS",
    "DEFAULT_METHOD",
    "DEFAULT_MODEL",
    "METHODS",
    "Conditioning",
    "Ensemble",
    "LatentDiffusion",
    "Method",
    "ModelLoadError",
    "ProtectionConfig",
    "ProtectionOutput",
    "Protector",
    "StepInputs",
    "UnsupportedModelError",
    "get_method",
    "load_models",
]

if TYPE_CHECKING:
    from .ensemble import Ensemble
    from .methods import METHODS, Method, StepInputs, get_method
    from .models import (
        Conditioning,
        LatentDiffusion,
        ModelLoadError,
        UnsupportedModelError,
        load_models,
    )
    from .protector import CATEGORY_PROMPTS, ProtectionConfig, ProtectionOutput, Protector


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, for tab completion
    return sorted(set(globals()) | set(_LAZY))
