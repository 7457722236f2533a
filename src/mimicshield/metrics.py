"""Image-quality metrics between clean and protected images: PSNR, SSIM, L-inf and LPIPS.

Every function takes two batches ``a`` and ``b`` of shape (N, 3, H, W) with values in [0, 1] and
returns one value per image, shape (N,), so callers can report per-image tables and aggregate as
they like.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "LPIPS",
    "LPIPS_WEIGHTS_ENV",
    "default_lpips_path",
    "json_number",
    "linf_255",
    "number_from_json",
    "psnr",
    "ssim",
]

LPIPS_WEIGHTS_ENV = "MIMICSHIELD_LPIPS_WEIGHTS"


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(
            f"expected two (N, C, H, W) batches of equal shape, got {a.shape}, {b.shape}"
        )


# values per chunk of PSNR and per strip of SSIM: tens of MB, whatever the image's size
METRIC_CHUNK = 2**21


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB with data range 1; identical images give +inf.

    Computed in float64 so that tiny perturbations (a few 1/255 steps) are not lost to rounding,
    and in chunks, because float64 copies of a whole 50-megapixel image take gigabytes.
    """
    _check_pair(a, b)
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"psnr takes float images in [0, 1]; got {a.dtype} (divide by 255).")
    # on the CPU: MPS has no float64
    flat_a, flat_b = a.detach().cpu().flatten(1), b.detach().cpu().flatten(1)
    squared = torch.zeros(a.shape[0], dtype=torch.float64)
    for start in range(0, flat_a.shape[1], METRIC_CHUNK):
        part = slice(start, start + METRIC_CHUNK)
        squared += (flat_a[:, part].double() - flat_b[:, part].double()).pow(2).sum(dim=1)
    mse = squared / flat_a.shape[1]
    # -10 log10(0) = +inf, which is the honest answer for identical images.
    return (-10 * torch.log10(mse)).to(a.device, a.dtype)


SSIM_WINDOW = 11  # pixels: the Gaussian window of Wang et al. (2004), sigma 1.5
LPIPS_MIN_SIZE = 31  # pixels a side: below, AlexNet's second max-pool gets an empty input


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity (11x11 Gaussian window, sigma 1.5, data range 1) per image: the
    mean over channels and over the windows that lie inside the image, as Wang et al. define it.

    Images smaller than the window have no SSIM: NaN (torchmetrics would fail on them).

    Computed in strips of rows (each with the window's margin above and below, so every
    window sees exactly the pixels it would see in the whole image): torchmetrics needs about
    35 times the image's memory, 20 GB for a 50-megapixel photo.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        return torch.full((a.shape[0],), float("nan"), dtype=a.dtype, device=a.device)
    count, channels, height, width = a.shape
    border = SSIM_WINDOW // 2
    rows = max(1, METRIC_CHUNK // (count * channels * width))  # window centres per strip
    total = torch.zeros(count, dtype=torch.float64)
    for first in range(border, height - border, rows):
        last = min(first + rows, height - border)  # the strip's window centres: [first, last)
        strip = slice(first - border, last + border)
        total += _ssim_inside(a[..., strip, :], b[..., strip, :]).cpu().double()
    windows = channels * (height - 2 * border) * (width - 2 * border)
    return (total / windows).to(a.device, a.dtype)


def _ssim_inside(a: Tensor, b: Tensor) -> Tensor:
    """Per image, the sum of the SSIM map over the windows that lie inside ``a`` and ``b``."""
    # The image subpackage: importing torchmetrics.functional itself emits FutureWarnings.
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        a, b, data_range=1.0, reduction="none", return_full_image=True
    )
    # torchmetrics averages a map it computed on a reflection-padded image; Wang et al. (and
    # skimage) average only the windows inside the image: crop the padded border away.
    border = SSIM_WINDOW // 2
    return full[..., border:-border, border:-border].flatten(1).sum(1)


def json_number(value: float | None):
    """JSON has no inf or NaN: write them as the strings "inf", "-inf" and "nan"."""
    if (
        value is None
        or (isinstance(value, float) and math.isfinite(value))
        or isinstance(value, int)
    ):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def number_from_json(value):
    """The inverse of :func:`json_number`: "inf", "-inf" and "nan" back to floats."""
    return float(value) if value in ("inf", "-inf", "nan") else value


def linf_255(a: Tensor, b: Tensor) -> Tensor:
    """Largest absolute pixel difference in 1/255 units, the usual budget unit (e.g. 8/255 -> 8).

    Each result is snapped to the nearest whole 1/255 step when within 1e-3 of it, so float32
    rounding does not report a +-8/255 perturbation as 8.0000067 (a 16-bit file's steps,
    255/65535 = 0.0039 units, are kept).
    """
    _check_pair(a, b)
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"linf_255 takes float images in [0, 1]; got {a.dtype} (divide by 255).")
    flat_a, flat_b = a.detach().flatten(1), b.detach().flatten(1)
    largest = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, flat_a.shape[1], METRIC_CHUNK):  # in chunks, as psnr
        part = slice(start, start + METRIC_CHUNK)
        difference = (flat_a[:, part].float() - flat_b[:, part].float()).abs().amax(dim=1)
        largest = torch.maximum(largest, difference)
    units = largest.cpu().double() * 255  # N numbers; float64 is not on every device (MPS)
    snapped = torch.where((units - units.round()).abs() < 1e-3, units.round(), units)
    return snapped.to(a.device, a.dtype)


# --- LPIPS v0.1 (AlexNet) --------------------------------------------------------------------
# Written here rather than taken from torchmetrics: torchmetrics' LPIPS needs torchvision and
# downloads the backbone at first use, while this one runs fully offline from one safetensors
# file (AlexNet conv weights + the LPIPS v0.1 linear heads).

# ScalingLayer constants of LPIPS: inputs in [-1, 1] are standardised with these per channel.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_ALEX_CHANNELS = (64, 192, 384, 256, 256)
_ALEX_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs whose outputs LPIPS compares


def _alexnet_features() -> nn.Sequential:
    """AlexNet's conv trunk, indexed like torchvision's ``features`` so the weights load by name."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    )


class _LinearHead(nn.Module):
    """Non-negative 1x1 channel weighting of one tap; ``model.1`` matches the official key names."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 0 is dropout in the official model (training only), so an Identity here.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_normalize(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Scale every spatial feature vector to unit length along channels."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def default_lpips_path() -> Path:
    """The LPIPS weights file named by ``$MIMICSHIELD_LPIPS_WEIGHTS``; a clear error otherwise."""
    value = os.environ.get(LPIPS_WEIGHTS_ENV)
    if not value:
        raise FileNotFoundError(
            "No LPIPS weights given. Pass the path to lpips_alexnet.safetensors (AlexNet conv "
            f"weights + LPIPS v0.1 heads), or set {LPIPS_WEIGHTS_ENV} to it."
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{LPIPS_WEIGHTS_ENV}={value!r} does not point to a file.")
    return path


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; images in [0, 1], distance per image, shape (N,).

    d(a, b) = sum_l mean_hw( w_l . (n_l(a) - n_l(b))^2 ), where n_l are the channel-unit-normalised
    ReLU outputs of AlexNet's five conv layers and w_l the learned non-negative head weights.
    Parameters are frozen, but gradients flow to the inputs, so it also works as a loss.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _alexnet_features()
        for i, channels in enumerate(_ALEX_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(channels))

    @classmethod
    def from_file(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> LPIPS:
        """Load ``lpips_alexnet.safetensors`` strictly; ``None`` uses :func:`default_lpips_path`."""
        from safetensors.torch import load_file

        path = default_lpips_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
        model = cls()
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.to(device).eval().requires_grad_(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _ALEX_TAPS:
                taps.append(_unit_normalize(x))
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-image distance; NaN for images under :data:`LPIPS_MIN_SIZE` pixels a side, where
        AlexNet's pooling layers have nothing left to pool."""
        _check_pair(a, b)
        n = a.shape[0]
        if min(a.shape[-2:]) < LPIPS_MIN_SIZE:
            return torch.full((n,), float("nan"), dtype=a.dtype, device=a.device)
        # One pass over both batches: [0, 1] -> [-1, 1] -> LPIPS ScalingLayer.
        x = torch.cat([a, b]).to(self.shift) * 2 - 1
        x = (x - self.shift) / self.scale
        heads = [getattr(self, f"lin{i}") for i in range(len(_ALEX_CHANNELS))]
        total = x.new_zeros(n)
        for head, f in zip(heads, self._taps(x), strict=True):
            total = total + head((f[:n] - f[n:]).pow(2)).mean(dim=(1, 2, 3))
        return total
