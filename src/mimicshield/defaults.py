"""Defaults shared by the library and the CLI, kept free of heavy imports.

The CLI reads these at import time, so ``mimicshield --help`` answers without loading torch.
"""

from __future__ import annotations

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # the paper's model
DEFAULT_METHOD = "sds-"  # SDS(-), the paper's recommendation
DEFAULT_WORK_SIZE: int | None = 512  # measured: see README, "Work size: measured, not guessed"
DEFAULT_TILE_SIZE = 1024
