"""Protect against several latent diffusion models at once.

The paper reports that protection transfers across latent diffusion backbones; an ensemble makes
it explicit. Each step moves along ``sign(sum_k w_k d_k(x))``: the weighted sum of the per-model
step directions, taken *before* the sign, so a model with a larger weight pulls harder on every
pixel. Each model gets its own draws of t, n and the posterior, its own text conditioning and its
own target latent, because latent spaces differ (an SDXL latent is not an SD 1.5 latent).

Weights are normalised to sum to 1. The sign step only sees their ratios, and normalised weights
keep the summed direction on the scale of one model's, so logs and tests read the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor


class Ensemble:
    """Several models, each with a weight; pass it to :class:`~mimicshield.protector.Protector`
    in place of a single model.

    Arguments:
        models: :class:`~mimicshield.models.LatentDiffusion` models, all on the same device.
        weights: one positive weight per model; None weighs them equally. Normalised to sum 1.

    Examples::
        >>> ensemble = Ensemble([sd15, sdxl], weights=[1, 2])
        >>> protected = Protector(ensemble, method="sds-")(images)
    """

    def __init__(self, models: Sequence, weights: Sequence[float] | None = None) -> None:
        models = list(models)
        if not models:
            raise ValueError("An ensemble needs at least one model.")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models):
            raise ValueError(f"Got {len(weights)} weights for {len(models)} models; give one each.")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"Ensemble weights must be positive numbers; got {weights}.")
        devices = {torch.device(model.device) for model in models}
        if len(devices) > 1:
            raise ValueError(
                f"All ensemble models must be on one device; got {sorted(map(str, devices))}."
            )
        total = sum(weights)
        self.models = models
        self.weights = [w / total for w in weights]

    def __repr__(self) -> str:
        members = ", ".join(
            f"{getattr(m, 'name', '') or type(m).__name__}: {w:.3g}" for m, w in self
        )
        return f"Ensemble({members})"

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[tuple[object, float]]:
        return iter(zip(self.models, self.weights, strict=True))

    @property
    def device(self) -> torch.device:
        return self.models[0].device


def members(model) -> list[tuple[object, float]]:
    """``(model, weight)`` pairs: an ensemble's members, or one model with weight 1."""
    if isinstance(model, Ensemble):
        return list(model)
    return [(model, 1.0)]


def weighted_direction(
    direction: Callable[..., Tensor], terms: Sequence[tuple[object, float, object]], x: Tensor
) -> Tensor:
    """d = sum_k w_k direction(model_k, x, inputs_k), one model at a time.

    Each direction is a finished gradient: its graph is freed before the next model's is built,
    so the activation memory peaks at one model's, whatever the ensemble size.
    """
    total = None
    for model, weight, inputs in terms:
        term = direction(model, x, inputs)
        if total is None:  # a weight of 1 (one model) is not a multiplication on the GPU
            total = term if weight == 1 else term * weight
        else:
            total = total.add_(term, alpha=weight)
    if total is None:
        raise ValueError("weighted_direction needs at least one model.")
    return total
