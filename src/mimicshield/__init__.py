"""mimicshield: protect images against diffusion-based mimicry (Xue et al., ICLR 2024)."""

from .methods import DEFAULT_METHOD, METHODS, StepInputs, get_method
from .models import DEFAULT_MODEL, LatentDiffusion, load_models
from .protector import CATEGORY_PROMPTS, ProtectionConfig, Protector

__version__ = "0.1.0"

__all__ = [
    "CATEGORY_PROMPTS",
    "DEFAULT_METHOD",
    "DEFAULT_MODEL",
    "METHODS",
    "LatentDiffusion",
    "ProtectionConfig",
    "Protector",
    "StepInputs",
    "get_method",
    "load_models",
]
