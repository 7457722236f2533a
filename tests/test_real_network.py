"""Attacks through a real trained encoder (TAEF2, ../shared/assets/weights), not random weights.

Setting: 256x256 centre crops, eps = 8/255, 20 steps, alpha = 1/255. "Distance" is
||E(x) - E(x0)||_2 on the TAEF2 latent. The baseline is uniform noise U[-eps, eps], rounded to
8 bits like a saved file. Measured here (torch 2.13 CPU, seed 0):

    image                    encoder / noise   photoguard(grey) / noise   PSNR (dB)
    astronaut (portrait)     4.01x             2.09x                      32.4
    Van Gogh sunflowers      5.06x             2.91x                      31.9
    forest path (landscape)  5.74x             3.06x                      32.0
    Pepper&Carrot coriander  3.15x             1.64x                      32.9   (not asserted)

The flat-background anime drawing moves least; the test asserts on the three photos/paintings.
These are figures for this tiny autoencoder's latent space, not SD protection quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGES, WEIGHTS, requires_assets
from PIL import Image

from mimicshield.metrics import psnr
from mimicshield.models import _cpu_has_amx
from mimicshield.protector import Protector

pytestmark = [requires_assets, pytest.mark.slow]

FILES = [
    "portrait/astronaut_eileen_collins.png",
    "artwork/vangogh_sunflowers_1888.png",
    "landscape/forest_path.png",
]
SIZE, EPS, STEPS = 256, 8 / 255, 20


def centre_crop(path, size: int = SIZE) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    image = image.crop(box).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def setup():
    from mimicshield.taesd import TinyAutoencoderLatents

    model = TinyAutoencoderLatents.from_dir(WEIGHTS)
    clean = torch.stack([centre_crop(IMAGES / f) for f in FILES])
    uniform = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = ((clean + uniform * EPS).clamp(0, 1) * 255).round() / 255
    with torch.no_grad():
        z0 = model.encode(clean * 2 - 1)
        noise_distance = latent_distance(model, noisy, z0)
    return model, clean, z0, noise_distance


def latent_distance(model, images: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model.encode(images * 2 - 1) - z0).flatten(1).norm(dim=1)


@pytest.mark.parametrize(
    ("method", "target", "min_ratio"),
    [("encoder", None, 3.5), ("photoguard", torch.full((3, SIZE, SIZE), 0.5), 1.8)],
)
def test_attack_moves_the_real_encoder_far_more_than_noise(setup, method, target, min_ratio):
    model, clean, z0, noise_distance = setup
    protected = Protector(model, method, eps=EPS, steps=STEPS, target=target)(clean)
    ratio = latent_distance(model, protected, z0) / noise_distance
    assert torch.all(ratio >= min_ratio), ratio
    assert torch.all(psnr(protected, clean) >= 30.0)
    assert ((protected - clean).abs() * 255).round().max() <= 8


@pytest.mark.skipif(
    not _cpu_has_amx(),
    reason="no AMX on this CPU: --dtype auto keeps fp32 here, and emulated bf16 convolutions "
    "take many minutes",
)
def test_bf16_attacks_the_real_encoder_as_well_as_fp32(setup):
    """What ``--dtype auto`` picks on AMX CPUs and most GPUs loses next to nothing: the attack
    computed in bf16 moves the fp32 encoder's latent (nearly) as far as the fp32 attack does."""
    from mimicshield.taesd import TinyAutoencoderLatents

    model, clean, z0, _ = setup
    clean, z0 = clean[:1], z0[:1]  # one image: the comparison, not the spread, is the point
    half = TinyAutoencoderLatents.from_dir(WEIGHTS, dtype=torch.bfloat16)
    moved = {
        name: latent_distance(model, Protector(engine, "encoder", eps=EPS, steps=STEPS)(clean), z0)
        for name, engine in (("fp32", model), ("bf16", half))
    }
    assert torch.all(moved["bf16"] >= 0.95 * moved["fp32"]), moved
