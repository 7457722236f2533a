"""mimicshield: protect images against diffusion-based mimicry (Xue et al., ICLR 2024)."""

# First: sets PYTORCH_ENABLE_MPS_FALLBACK on macOS, which torch only reads while it loads.
from . import mps  # noqa: F401
from .ensemble import Ensemble
from .methods import DEFAULT_METHOD, METHODS, StepInputs, get_method
from .models import DEFAULT_MODEL, Conditioning, LatentDiffusion, load_models
from .protector import CATEGORY_PROMPTS, ProtectionConfig, Protector

__version__ = "0.1.0"

__all__ = [
    "CATEGORY_PROMPTS",
    "DEFAULT_METHOD",
    "DEFAULT_MODEL",
    "METHODS",
    "Conditioning",
    "Ensemble",
    "LatentDiffusion",
    "ProtectionConfig",
    "Protector",
    "StepInputs",
    "get_method",
    "load_models",
]
