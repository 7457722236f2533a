"""Apple MPS specifics: the CPU fallback for missing operators, and the dtypes MPS supports.

Importing this module sets ``PYTORCH_ENABLE_MPS_FALLBACK=1`` on macOS unless the user chose a
value. torch reads the variable once, while it loads, so ``mimicshield/__init__.py`` imports this
module before anything imports torch; a program that imported torch first keeps torch's default
(operators MPS lacks raise instead of running on the CPU).

No MPS machine runs the test suite: the decisions here are tested with the platform mocked.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MPS_FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"


def enable_mps_fallback(
    environ: MutableMapping[str, str] | None = None,
    *,
    platform: str | None = None,
    torch_loaded: bool | None = None,
) -> bool:
    """Let operators that MPS lacks run on the CPU instead of failing with "not implemented".

    Returns whether the fallback will be in effect: on macOS, the variable set (now or by the
    user) to a non-zero value before torch loaded. The arguments exist for tests.
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    if platform != "darwin":
        return False
    environ.setdefault(MPS_FALLBACK_VARIABLE, "1")
    return not torch_loaded and environ[MPS_FALLBACK_VARIABLE].strip() not in ("", "0")


def mps_supports_bf16() -> bool:
    """bf16 kernels on MPS need macOS 14 (Sonoma) or newer."""
    import torch

    return bool(torch.backends.mps.is_macos_or_newer(14, 0))


def check_mps_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to use on ``device``: unchanged, except where MPS cannot run it.

    MPS has no float64 (an error that names the fix beats torch's), and bf16 only from macOS 14:
    before that, fp16 is used with a warning.
    """
    import torch

    if device.type != "mps":
        return dtype
    if dtype == torch.float64:
        raise ValueError("MPS does not support float64; use --dtype fp32, fp16 or auto.")
    if dtype == torch.bfloat16 and not mps_supports_bf16():
        warnings.warn("bf16 on MPS needs macOS 14 or newer; using fp16.", stacklevel=2)
        return torch.float16
    return dtype


enable_mps_fallback()
