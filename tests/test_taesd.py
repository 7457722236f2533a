"""TAEF2 tiny autoencoder: strict loading of the real weights, shapes, and round-trip quality.

Measured round-trip PSNR on ``images/portrait/astronaut_eileen_collins.png`` (torch 2.13 CPU, fp32):
- resized to 128x128 (Pillow BOX filter): 25.76 dB -> asserted above a bicubic round trip
  through half the resolution (24.86 dB), computed in the test
- full 512x512: 31.19 dB (the research note says "about 31 dB") -> asserted >= 30.5 dB

A wrong architecture is far off: ignoring the GroupNorm branch gives ~16 dB, other GroupNorm group
counts or placements give 17-30 dB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGES, WEIGHTS, requires_assets
from PIL import Image

from mimicshield.metrics import psnr
from mimicshield.taesd import TinyAutoencoder, TinyAutoencoderLatents, load_taef2

ASTRONAUT = IMAGES / "portrait" / "astronaut_eileen_collins.png"
PSNR_512_MIN = 30.5  # measured 31.19 dB


@pytest.fixture(scope="module")
def taef2() -> TinyAutoencoder:
    return load_taef2(WEIGHTS)


def _astronaut(size: int) -> torch.Tensor:
    image = Image.open(ASTRONAUT).convert("RGB").resize((size, size), Image.BOX)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="taef2_encoder.pth"):
        load_taef2(tmp_path)


def test_random_model_has_the_published_parameter_counts():
    model = TinyAutoencoder()
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_338_528
    assert sum(p.numel() for p in model.decoder.parameters()) == 1_338_499


@requires_assets
def test_weights_load_strictly_and_match_the_files(taef2):
    for part in ("encoder", "decoder"):
        stored = torch.load(WEIGHTS / f"taef2_{part}.pth", weights_only=True)
        ours = getattr(taef2, part).state_dict()
        assert set(ours) == set(stored)
        for key, value in stored.items():
            assert torch.equal(ours[key], value.float()), key
    assert not any(p.requires_grad for p in taef2.parameters())
    assert not taef2.training


@requires_assets
def test_latent_shape(taef2):
    with torch.no_grad():
        z = taef2.encode(torch.rand(2, 3, 64, 96))
        x = taef2.decode(z)
    assert z.shape == (2, 32, 8, 12)
    assert x.shape == (2, 3, 64, 96)
    assert x.min() >= 0 and x.max() <= 1


@requires_assets
def test_round_trip_psnr_128_beats_halving_the_resolution(taef2):
    """An 8x-downsampling autoencoder with 32 latent channels keeps more than a bicubic round
    trip through half the resolution does (a quarter of the pixels); computed here, not copied."""
    x = _astronaut(128)
    with torch.no_grad():
        value = psnr(taef2(x), x).item()
    half = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True)
    baseline = psnr(torch.nn.functional.interpolate(half, size=(128, 128), mode="bicubic"), x)
    assert value > baseline.item(), (value, baseline.item())


@requires_assets
@pytest.mark.slow
def test_round_trip_psnr_512_matches_the_research_note(taef2):
    x = _astronaut(512)
    with torch.no_grad():
        value = psnr(taef2(x), x).item()
    assert value >= PSNR_512_MIN


@requires_assets
def test_latents_adapter_matches_the_engine_interface(taef2):
    adapter = TinyAutoencoderLatents(taef2)
    assert adapter.device == torch.device("cpu")
    assert adapter.dtype == torch.float32
    assert adapter.latent_shape(64, 96) == (32, 8, 12)

    x01 = torch.rand(1, 3, 64, 64)
    x = (x01 * 2 - 1).requires_grad_(True)
    z = adapter.encode(x, torch.randn(1, 32, 8, 8))  # posterior noise is ignored
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, taef2.encode(x01), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.encode(x, None), z)

    z.square().mean().backward()  # gradients reach the pixels through the frozen encoder
    assert x.grad is not None and x.grad.abs().sum() > 0

    with torch.no_grad():
        back = adapter.decode(z)
    assert back.shape == x.shape and back.min() >= -1 and back.max() <= 1
