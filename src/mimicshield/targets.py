"""The built-in target image for the targeted methods (photoguard, mist, sdst-).

A procedurally generated, high-contrast, textured pattern: the textural loss pulls E(x) towards
its latent, so mimicry of a protected image drifts towards this texture. It is defined in pixel
units (periods of 12-48 px), so its texture survives the VAE's 8x downsampling at any size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def target_pattern(height: int, width: int) -> Tensor:
    """A (3, height, width) image in [0, 1]: checkerboard x rings x stripes, per channel."""
    y = torch.arange(height, dtype=torch.float32).view(-1, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, -1)
    checker = torch.sign(torch.sin(2 * math.pi * x / 32) * torch.sin(2 * math.pi * y / 32))
    radius = torch.sqrt((x - width / 2) ** 2 + (y - height / 2) ** 2)
    channels = []
    for phase, period in ((0.0, 12.0), (2.1, 18.0), (4.2, 27.0)):
        rings = torch.sin(2 * math.pi * radius / period + phase)
        stripes = torch.sin(2 * math.pi * (x + y) / (period * 1.7) - phase)
        channels.append(torch.sign(checker * 0.6 + rings * 0.8 + stripes * 0.5))
    return (torch.stack(channels) + 1) / 2
