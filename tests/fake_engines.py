"""Stand-ins for the protection engine, for tests of everything around it.

They follow ``Protector.protect``'s contract (images in [0, 1], per-image seeds, a step
callback, a frozen config) at no cost, so the file handling can be tested on many images in
milliseconds. The real engine is covered by the tests that use the tiny model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mimicshield.protector import ProtectionOutput


@dataclass(frozen=True)
class FakeConfig:
    eps: float = 8 / 255
    steps: int = 2
    seed: int = 0
    quantize_levels: int | None = 255
    method: str = "noise"

    def to_dict(self) -> dict:
        return asdict(self)


class NoiseEngine:
    """Adds +-eps per pixel and channel, drawn from each image's seed; records its calls."""

    def __init__(self, **config) -> None:
        self.config = FakeConfig(**config)
        self.shapes: list[tuple[int, ...]] = []

    def protect(self, images, *, seeds=None, callback=None) -> ProtectionOutput:
        self.shapes.append(tuple(images.shape))
        seeds = [self.config.seed] * len(images) if seeds is None else seeds
        signs = torch.stack(
            [
                torch.randint(0, 2, images.shape[1:], generator=torch.Generator().manual_seed(s))
                for s in seeds
            ]
        )
        for step in range(self.config.steps):
            if callback is not None:
                callback(step + 1, self.config.steps)
        adversarial = (images + (signs * 2 - 1) * self.config.eps).clamp(0, 1)
        return ProtectionOutput(images=adversarial)


class TilePainter(NoiseEngine):
    """Paints each tile with +eps or -eps by its seed's parity: neighbouring tiles get opposite
    signs, the worst case for a visible seam."""

    def protect(self, images, *, seeds=None, callback=None) -> ProtectionOutput:
        self.shapes.append(tuple(images.shape))
        seeds = seeds or [0] * len(images)
        signs = torch.tensor([1.0 if s % 2 == 0 else -1.0 for s in seeds]).view(-1, 1, 1, 1)
        for step in range(self.config.steps):
            if callback is not None:
                callback(step + 1, self.config.steps)
        return ProtectionOutput(images=(images + signs * self.config.eps).clamp(0, 1))


class SmallCardEngine(NoiseEngine):
    """Runs out of device memory on batches larger than ``fits``, like a small GPU."""

    def __init__(self, fits: int, **config) -> None:
        super().__init__(**config)
        self.fits = fits

    def protect(self, images, *, seeds=None, callback=None) -> ProtectionOutput:
        if len(images) > self.fits:
            self.shapes.append(tuple(images.shape))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().protect(images, seeds=seeds, callback=callback)
