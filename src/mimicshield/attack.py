"""The projected sign-gradient loop, written once for every method (as torchattacks' PGD)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def project_linf(x: Tensor, x0: Tensor, eps: float) -> Tensor:
    """x <- clip(x0 + clip(x - x0, -eps, eps), -1, 1), in the [-1, 1] image range."""
    return torch.clamp(x0 + torch.clamp(x - x0, -eps, eps), -1.0, 1.0)


def projected_sign_steps(
    x0: Tensor,
    direction: Callable[[Tensor, int], Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Run ``steps`` steps of x <- project(x + step_size * sign(direction(x, i))).

    Args:
        x0: clean images in [-1, 1], shape (B, C, H, W).
        direction: the method's step direction for the current ``x`` at step ``i``.
        eps: the L-infinity budget in [-1, 1] units (twice the [0, 1] pixel-scale budget).
        step_size: alpha, in [-1, 1] units.
        steps: number of steps.
        start: an initial perturbation (random start), or None to start at ``x0``.
        callback: called as ``callback(i, x)`` after every step, for progress bars.
    """
    x0 = x0.detach()
    x = x0.clone() if start is None else project_linf(x0 + start, x0, eps)
    for i in range(steps):
        step = direction(x, i).sign()
        x = project_linf(x.detach() + step_size * step, x0, eps)
        if callback is not None:
            callback(i, x)
    return x.detach()


def quantize_within_budget(x: Tensor, x0: Tensor, eps: float, levels: int = 255) -> Tensor:
    """Round [0, 1] images to ``levels`` steps, keeping every pixel within ``eps`` of ``x0``.

    Rounding alone can push a pixel half a level past eps (the reference truncated and reached
    17/255 for eps = 16/255). Each pixel is clamped to the levels inside [x0 - eps, x0 + eps],
    which also holds when ``x0`` itself is between levels (a resized or generated image).
    """
    budget = float(_snap(torch.tensor(eps * levels, dtype=torch.float64), 1e-6))
    # pixel by pixel, so in chunks: float64 copies of a whole 50-megapixel photo took 6 GiB
    flat, flat0 = x.detach().cpu().reshape(-1), x0.detach().cpu().reshape(-1)
    out = torch.empty(flat.shape, dtype=x.dtype)
    for start in range(0, flat.numel(), QUANTIZE_CHUNK):
        part = slice(start, start + QUANTIZE_CHUNK)
        out[part] = _quantize(flat[part], flat0[part], budget, levels)
    return out.reshape(x.shape)


QUANTIZE_CHUNK = 2**22  # values per pass: 32 MiB per float64 copy


def _quantize(x: Tensor, x0: Tensor, budget: float, levels: int) -> Tensor:
    """:func:`quantize_within_budget` of flat CPU values, ``budget`` in levels."""
    # float64. A float32 pixel is off its level by up to levels * 2^-25 (0.002 of a 16-bit
    # level), so values that close to a level are taken as that level (the file's).
    x0_levels = _snap(x0.double() * levels, levels * 2.0**-23)
    lowest = torch.ceil(x0_levels - budget).clamp(min=0)
    highest = torch.floor(x0_levels + budget).clamp(max=levels)
    q = torch.round(x.double() * levels)
    return torch.minimum(torch.maximum(q, lowest), highest) / levels


def _snap(values: Tensor, tolerance: float) -> Tensor:
    """Values within ``tolerance`` of an integer, made that integer."""
    nearest = torch.round(values)
    return torch.where((values - nearest).abs() < tolerance, nearest, values)
