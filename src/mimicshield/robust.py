"""Robust protection: optimise the expectation over transformations (EOT, Athalye et al. 2018).

A perturbation tuned for E(x) alone can be undone by the JPEG or resize an upload applies. EOT
instead follows the gradient of E(T(x)) for a transform T drawn afresh at every step, through
differentiable versions of the purifications in :mod:`mimicshield.purify`. The methods' maths
is untouched: :class:`TransformedEncoder` wraps the model so that ``encode(x)`` becomes
``encode(T(x))``, and every other attribute (UNet, schedule, prompts) passes through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .purify import NOISE_SIGMA, gaussian_blur, rescale
from .reproducibility import deterministic_resampling

__all__ = [
    "EOT",
    "ROBUST_TRANSFORMS",
    "TransformedEncoder",
    "differentiable_jpeg",
    "parse_robust",
]

JPEG_QUALITY = (60, 95)  # integer qualities drawn uniformly, both ends included
RESIZE_SCALE = (0.5, 1.0)
BLUR_SIGMA = (0.5, 1.5)
EOT_SEED_OFFSET = 0x5EED  # EOT draws from its own streams: the method's random inputs stay put

Transform = Callable[[Tensor], Tensor]  # one image batch (1, 3, H, W) in [0, 1] -> same


def differentiable_jpeg(images: Tensor, quality: float) -> Tensor:
    """kornia's differentiable JPEG (Reich et al. 2024): the codec with a smooth rounding."""
    from kornia.enhance import jpeg_codec_differentiable

    q = torch.full((images.shape[0],), float(quality), dtype=images.dtype, device=images.device)
    return jpeg_codec_differentiable(images, q)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _draw_jpeg(generator: torch.Generator, shape: Sequence[int]) -> Transform:
    low, high = JPEG_QUALITY
    quality = int(torch.randint(low, high + 1, (), generator=generator))
    return lambda x: differentiable_jpeg(x, quality)


def _draw_resize(generator: torch.Generator, shape: Sequence[int]) -> Transform:
    scale = _uniform(generator, *RESIZE_SCALE)
    return lambda x: rescale(x, scale)


def _draw_blur(generator: torch.Generator, shape: Sequence[int]) -> Transform:
    sigma = _uniform(generator, *BLUR_SIGMA)
    return lambda x: gaussian_blur(x, sigma)


def _draw_noise(generator: torch.Generator, shape: Sequence[int]) -> Transform:
    """Additive noise, not clamped: clamping would zero the gradient at saturated pixels."""
    noise = torch.randn(tuple(shape), generator=generator)
    return lambda x: x + NOISE_SIGMA * noise.to(x)


def _draw_identity(generator: torch.Generator, shape: Sequence[int]) -> Transform:
    return lambda x: x


ROBUST_TRANSFORMS: dict[str, Callable[[torch.Generator, Sequence[int]], Transform]] = {
    "jpeg": _draw_jpeg,
    "resize": _draw_resize,
    "blur": _draw_blur,
    "noise": _draw_noise,
    "none": _draw_identity,
}


def parse_robust(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"jpeg,resize"`` -> ("jpeg", "resize"); empty or None -> () (no EOT)."""
    if not spec:
        return ()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in ROBUST_TRANSFORMS]
    if unknown:
        raise ValueError(
            f"Unknown robust transform {unknown[0]!r}; choose from: {', '.join(ROBUST_TRANSFORMS)}."
        )
    return tuple(dict.fromkeys(names))


class TransformedEncoder:
    """``model`` whose ``encode(x)`` is ``model.encode(T(x))``; all else is ``model``'s own.

    ``transform`` maps a batch in [-1, 1] to a batch in [-1, 1] and must be differentiable.
    """

    def __init__(self, model, transform: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.transform = transform

    def encode(self, x: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        return self.model.encode(self.transform(x), posterior_noise)

    def __getattr__(self, name: str):
        if name == "model":  # not set yet (e.g. during copy): avoid recursing
            raise AttributeError(name)
        return getattr(self.model, name)


class EOT:
    """Draws, per image and step, one of ``names`` and its parameters, from the image's own seed.

    Every image has its own generator (seeded with its seed plus an offset), so the transforms
    an image sees do not depend on the batch it is in, and reruns draw the same sequence.
    """

    def __init__(self, names: Sequence[str], seeds: Sequence[int]) -> None:
        self.names = parse_robust(names)
        if not self.names:
            raise ValueError("EOT needs at least one transform.")
        self.generators = [torch.Generator().manual_seed(int(s) + EOT_SEED_OFFSET) for s in seeds]

    def draw(self, shape: Sequence[int]) -> Callable[[Tensor], Tensor]:
        """One transform per image for this step, as a function of the [-1, 1] batch."""
        transforms = []
        for generator in self.generators:
            index = int(torch.randint(len(self.names), (), generator=generator))
            transforms.append(ROBUST_TRANSFORMS[self.names[index]](generator, shape))

        def apply(x: Tensor) -> Tensor:
            x01 = (x + 1) / 2
            with deterministic_resampling():  # resize, blur and JPEG resample and pad
                out = [t(x01[i : i + 1]) for i, t in enumerate(transforms)]
            return torch.cat(out) * 2 - 1

        return apply

    def wrap(self, model, shape: Sequence[int]) -> TransformedEncoder:
        """``model`` with this step's freshly drawn transforms in front of its encoder."""
        return TransformedEncoder(model, self.draw(shape))
