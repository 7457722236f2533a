"""Metrics: LPIPS against the published goldens, PSNR/SSIM/L-inf against independent formulas.

Measured LPIPS v0.1 AlexNet from ``lpips_alexnet.safetensors`` (torch 2.13 CPU):
ex_ref vs ex_p0 = 0.721881, ex_ref vs ex_p1 = 0.137566 (official: 0.722 and 0.138).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ASSETS, WEIGHTS, requires_assets
from PIL import Image

from mimicshield.metrics import LPIPS, LPIPS_WEIGHTS_ENV, default_lpips_path, linf_255, psnr, ssim

GOLDEN = ASSETS / "golden"
LPIPS_FILE = WEIGHTS / "lpips_alexnet.safetensors"


def _load(name: str) -> torch.Tensor:
    array = np.array(Image.open(GOLDEN / name).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS.from_file(LPIPS_FILE)


@requires_assets
def test_lpips_golden_values(lpips):
    ref, p0, p1 = _load("ex_ref.png"), _load("ex_p0.png"), _load("ex_p1.png")
    with torch.no_grad():
        d = lpips(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert d.shape == (2,)
    assert abs(d[0].item() - 0.722) < 1e-3
    assert abs(d[1].item() - 0.138) < 1e-3


@requires_assets
def test_lpips_of_identical_images_is_zero_and_gradients_flow(lpips):
    ref = _load("ex_ref.png")
    with torch.no_grad():
        assert lpips(ref, ref).item() == 0.0
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    x = (ref + 0.05 * noise).clamp(0, 1).requires_grad_(True)
    lpips(x, ref).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_path_needs_a_path_or_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=LPIPS_WEIGHTS_ENV):
        default_lpips_path()
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError):
        default_lpips_path()
    with pytest.raises(FileNotFoundError):
        LPIPS.from_file(tmp_path / "missing.safetensors")
    weights = tmp_path / "w.safetensors"
    weights.touch()
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(weights))
    assert default_lpips_path() == weights


def test_psnr_identical_is_inf():
    x = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


def test_psnr_refuses_integer_images():
    """uint8 images one level apart gave tensor([0], dtype=uint8) for 48.1 dB."""
    a = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="divide by 255"):
        psnr(a, a + 1)


def test_psnr_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 20, 24, generator=generator)
    b = (a + 0.05 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    an, bn = a.double().numpy(), b.double().numpy()
    mse = ((an - bn) ** 2).reshape(3, -1).mean(axis=1)
    expected = 10 * np.log10(1.0 / mse)
    got = psnr(a, b)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # one 1/255 step on every pixel is 48.13 dB
    assert math.isclose(psnr(a, a + 1 / 255)[0].item(), 20 * math.log10(255), rel_tol=1e-5)


def test_ssim_identical_is_one_and_drops_with_noise():
    generator = torch.Generator().manual_seed(1)
    # a smooth image, so SSIM is not already near zero for pure-noise content
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=generator), size=64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    values = [
        ssim(x, (x + s * torch.randn(x.shape, generator=generator)).clamp(0, 1))
        for s in (0.01, 0.05, 0.2)
    ]
    assert all(v.shape == (2,) for v in values)
    assert (values[0] < 1).all()
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()


def test_ssim_of_images_smaller_than_its_window_is_nan():
    a = torch.rand(2, 3, 10, 40)
    assert torch.isnan(ssim(a, a)).all() and ssim(a, a).shape == (2,)
    b = torch.rand(1, 3, 11, 11)
    assert ssim(b, b).item() == pytest.approx(1.0)


@requires_assets
def test_lpips_of_images_too_small_for_alexnet_is_nan(lpips):
    from mimicshield.metrics import LPIPS_MIN_SIZE

    small = torch.rand(2, 3, LPIPS_MIN_SIZE - 1, 64)
    assert torch.isnan(lpips(small, small)).all()
    fits = torch.rand(1, 3, LPIPS_MIN_SIZE, LPIPS_MIN_SIZE)
    assert lpips(fits, fits).item() == pytest.approx(0.0, abs=1e-6)


def test_linf_255_is_exact():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0, 1, 2, 3] = 7 / 255
    b[1, 0, 0, 0] = -3 / 255
    b[1, 2, 1, 1] = 2 / 255
    torch.testing.assert_close(linf_255(a, b), torch.tensor([7.0, 3.0]))
    assert linf_255(a, a).eq(0).all()


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_ssim_is_wang_et_al_over_the_windows_inside_the_image():
    """Eq. 13 of Wang et al. (2004) by hand: an 11x11 Gaussian window (sigma 1.5), C1 =
    (0.01)^2, C2 = (0.03)^2, the map averaged over channels and the valid windows only."""
    generator = torch.Generator().manual_seed(3)
    a = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 7, generator=generator), size=(30, 36))
    b = (a + 0.05 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    window = torch.outer(g, g) / g.sum() ** 2
    kernel = window.expand(3, 1, 11, 11)

    def mean(t):
        return torch.nn.functional.conv2d(t.double(), kernel, groups=3)  # valid windows only

    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    want = ssim_map.flatten(1).mean(1).float()
    torch.testing.assert_close(ssim(a, b), want, rtol=0, atol=1e-5)
