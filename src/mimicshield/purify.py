"""Purifications: what an attacker may do to a protected image before mimicking it.

Every purification is a deterministic, size-preserving function on (N, 3, H, W) batches in
[0, 1]. The cheap ones (JPEG, resizing, cropping, blur, noise, an AdverseCleaner-style filter)
need nothing else; the VAE round trip and SDEdit take the model whose encoder was attacked.

:func:`surviving_distortion` measures how much of the perturbation's effect on the latent is
left after a purification: ``||E(p(x_adv)) - E(p(x0))|| / ||E(x_adv) - E(x0)||``. 1 means the
purification left the latent shift intact, 0 that it removed it completely.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .reproducibility import reflect_pad
from .resolution import pad_to_multiple

__all__ = [
    "PURIFICATIONS",
    "NotApplicableError",
    "Purification",
    "adverse_cleaner",
    "box_mean",
    "crop_resize",
    "gaussian_blur",
    "gaussian_noise",
    "get_purification",
    "guided_filter",
    "has_decoder",
    "jpeg",
    "latent_distance",
    "model_work_size",
    "parse_purifications",
    "rescale",
    "resize",
    "resize_to_model_size",
    "resize_to_work_size",
    "sdedit_purify",
    "surviving_distortion",
    "survival_ratio",
    "vae_roundtrip",
]

WORK_SIZE = 512  # SD 1.x's training resolution: what a mimic resizes to first (no model given)
NOISE_SIGMA = 4 / 255
SDEDIT_STRENGTH = 0.1


class NotApplicableError(ValueError):
    """A purification that cannot run with the given model (e.g. SDEdit without a UNet)."""


# --- resampling and filtering -------------------------------------------------------------------


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize to ``size`` = (H, W), antialiased when shrinking (as PIL); differentiable."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def rescale(images: Tensor, scale: float) -> Tensor:
    """Downscale by ``scale`` and back up: the fine detail the perturbation lives in is lost."""
    height, width = images.shape[-2:]
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize(resize(images, small), (height, width)).clamp(0, 1)


def resize_to_work_size(images: Tensor, work_size: int = WORK_SIZE) -> Tensor:
    """Resize the shorter side to the model's working size (aspect kept), then back."""
    height, width = images.shape[-2:]
    scale = work_size / min(height, width)
    return rescale(images, scale)


def model_work_size(model=None) -> int:
    """``model``'s own size (768 for SD 2.x-v, 1024 for SDXL), 512 without a model or when the
    model does not say (TAEF2)."""
    return getattr(model, "native_size", None) or WORK_SIZE


def resize_to_model_size(images: Tensor, model=None) -> Tensor:
    """:func:`resize_to_work_size` at :func:`model_work_size`."""
    return resize_to_work_size(images, model_work_size(model))


def crop_resize(images: Tensor, fraction: float = 0.2) -> Tensor:
    """Cut ``fraction`` of each side's length (half on each border), then resize back.

    Cropping shifts the 8-pixel latent grid against the perturbation and rescales it.
    """
    height, width = images.shape[-2:]
    top, left = round(height * fraction / 2), round(width * fraction / 2)
    keep_h, keep_w = max(1, height - 2 * top), max(1, width - 2 * left)
    crop = images[..., top : top + keep_h, left : left + keep_w]
    return resize(crop, (height, width)).clamp(0, 1)


def gaussian_kernel(sigma: float, radius: int | None = None) -> Tensor:
    """Normalised 1-D Gaussian, radius ceil(3 sigma) by default (as OpenCV picks for 8-bit)."""
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Separable Gaussian blur with mirrored borders; differentiable, so EOT reuses it.

    The mirror folds again as often as needed, so an image narrower than the kernel is
    mirrored too (``F.pad``'s reflection stops at one image width).
    """
    kernel = gaussian_kernel(sigma).to(images)
    radius = kernel.numel() // 2
    channels = images.shape[1]
    x = reflect_pad(images, (radius, radius, radius, radius))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def gaussian_noise(images: Tensor, sigma: float = NOISE_SIGMA, seed: int = 0) -> Tensor:
    """Add N(0, sigma^2) noise, clamped to [0, 1]; each image draws from its own seeded generator.

    The same seed for every image keeps a result independent of the batch it is in.
    """
    from .mimicry import per_image_noise

    noise = per_image_noise(images.shape[1:], images.shape[0], seed, images.device)
    return (images + sigma * noise.to(images)).clamp(0, 1)


def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as an image file stores it."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _from_array(array: np.ndarray, like: Tensor) -> Tensor:
    """(H, W, 3) uint8 or float in [0, 1] -> (3, H, W) tensor with the dtype/device of ``like``."""
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255
    return tensor.to(like)


def jpeg(images: Tensor, quality: int = 75) -> Tensor:
    """Encode and decode with Pillow's JPEG (libjpeg, 4:2:0 chroma), as a re-upload would."""
    from PIL import Image

    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(_to_uint8(image)).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(_from_array(np.asarray(Image.open(buffer).convert("RGB")), images))
    return torch.stack(out)


# --- AdverseCleaner-style filtering -------------------------------------------------------------


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over (2r+1)^2 boxes, edges mirrored (OpenCV's BORDER_REFLECT, as ximgproc's)."""
    import cv2

    size = (2 * radius + 1, 2 * radius + 1)
    return cv2.boxFilter(x, -1, size, normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide (their Eq. 19-21): q = mean(a)^T I + mean(b).

    In each box, a = (Sigma + eps U)^-1 cov(I, p) and b = mean(p) - a^T mean(I), with Sigma the
    3x3 covariance of the guide's colours. Where the guide has edges (Sigma >> eps) the output
    follows the guide; in flat regions it follows the smoothed source. Arrays are float (H, W,
    3); ``eps`` is a variance in the squared units of those arrays (16 on the 0-255 scale, as
    AdverseCleaner passes to OpenCV's guided filter).
    """
    guide, source = guide.astype(np.float64), source.astype(np.float64)
    channels = guide.shape[-1]
    mean_i, mean_p = box_mean(guide, radius), box_mean(source, radius)
    # Sigma[..., j, k] = mean(I_j I_k) - mean(I_j) mean(I_k); cov[..., j, c] likewise with p_c
    sigma = np.empty((*guide.shape[:2], channels, channels))
    cov = np.empty((*guide.shape[:2], channels, source.shape[-1]))
    for j in range(channels):
        for k in range(channels):
            sigma[..., j, k] = box_mean(guide[..., j] * guide[..., k], radius)
        sigma[..., j, :] -= mean_i[..., j, None] * mean_i
        for c in range(source.shape[-1]):
            cov[..., j, c] = box_mean(guide[..., j] * source[..., c], radius)
        cov[..., j, :] -= mean_i[..., j, None] * mean_p
    a = np.linalg.solve(sigma + eps * np.eye(channels), cov)  # (H, W, 3, C)
    b = mean_p - np.einsum("hwjc,hwj->hwc", a, mean_i)
    mean_a = np.stack(
        [box_mean(np.ascontiguousarray(a[..., j, :]), radius) for j in range(channels)], axis=2
    )
    return np.einsum("hwjc,hwj->hwc", mean_a, guide) + box_mean(b, radius)


def adverse_cleaner(
    images: Tensor,
    *,
    bilateral_passes: int = 64,
    diameter: int = 5,
    sigma_color: float = 8.0,
    sigma_space: float = 8.0,
    guided_passes: int = 4,
    guided_radius: int = 4,
    guided_eps: float = 16.0,
) -> Tensor:
    """Many small edge-preserving bilateral passes, then guided filters steered by the input.

    The bilateral passes wash out pixel-level noise but also soften texture; the guided filter,
    with the unfiltered image as guide, puts the input's edges back onto the smoothed result.
    The parameters are AdverseCleaner's: sigmas on the 0-255 scale, ``guided_eps`` a variance
    on that scale, and 8-bit images between passes, as its OpenCV calls keep them.
    """
    import cv2

    out = []
    for image in images:
        original = np.ascontiguousarray(_to_uint8(image))
        smoothed = original
        for _ in range(bilateral_passes):
            smoothed = cv2.bilateralFilter(smoothed, diameter, sigma_color, sigma_space)
        for _ in range(guided_passes):
            filtered = guided_filter(original, smoothed, guided_radius, guided_eps)
            smoothed = np.clip(np.round(filtered), 0, 255).astype(np.uint8)
        out.append(_from_array(smoothed.astype(np.float32) / 255, images))
    return torch.stack(out)


# --- model-based purifications ------------------------------------------------------------------


def has_decoder(model) -> bool:
    """Whether ``model`` can decode: TAEF2's adapter, or an SD model loaded ``with_decoder``."""
    if callable(getattr(model, "decode", None)):
        return True
    vae = getattr(model, "vae", None)
    return vae is not None and getattr(vae, "decoder", None) is not None


@torch.no_grad()
def vae_roundtrip(images: Tensor, model) -> Tensor:
    """D(E(x)) with the posterior mean: what every latent-diffusion edit starts from."""
    if model is None or not has_decoder(model):
        raise NotApplicableError("The VAE round trip needs a model loaded with its decoder.")
    height, width = images.shape[-2:]
    from .mimicry import decode

    x = pad_to_multiple(images.to(model.device, torch.float32)) * 2 - 1
    out = decode(model, model.encode(x))
    return out[..., :height, :width].to(images)


def sdedit_purify(
    images: Tensor, model, strength: float = SDEDIT_STRENGTH, seed: int = 0
) -> Tensor:
    """DiffPure-style SDEdit at t = strength (DDIM, no guidance) with the attacked model."""
    if model is None or getattr(model, "unet", None) is None or not has_decoder(model):
        raise NotApplicableError(
            "SDEdit needs a latent diffusion model with a UNet and a decoder (not TAEF2)."
        )
    from .mimicry import sdedit

    height, width = images.shape[-2:]
    out = sdedit(model, pad_to_multiple(images), strength, multistep=True, seed=seed)
    return out[..., :height, :width].to(images)


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Purification:
    """A named purification; ``needs`` says what model part it uses (None, "decoder", "unet").

    ``sized``: it reads the model's working size when a model is at hand, and runs without one.
    """

    name: str
    fn: Callable[..., Tensor]
    summary: str
    needs: str | None = None
    sized: bool = False

    def __call__(self, images: Tensor, model=None) -> Tensor:
        if self.needs is None and not self.sized:
            return self.fn(images)
        return self.fn(images, model)

    def parameters(self, model=None) -> dict:
        """The values it runs with (its function's defaults, and those the registry fixes),
        so that a record of a run says what was done: JPEG quality, blur sigma, noise seed.

        ``sized`` purifications add the working size they take from ``model``.
        """
        function, fixed = self.fn, {}
        if isinstance(function, partial):
            function, fixed = function.func, dict(function.keywords)
        values = {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty and name != "model"
        }
        values.update(fixed)
        if self.sized:
            values["size"] = model_work_size(model)
        return values

    def applicable(self, model) -> bool:
        """Whether this purification can run with ``model`` (None: no model at hand)."""
        if self.needs is None:
            return True
        if model is None or not has_decoder(model):
            return False
        return self.needs == "decoder" or getattr(model, "unet", None) is not None


PURIFICATIONS: dict[str, Purification] = {
    p.name: p
    for p in [
        *(
            Purification(f"jpeg{q}", partial(jpeg, quality=q), f"JPEG, quality {q}")
            for q in (95, 85, 75, 65)
        ),
        Purification("down0.5", partial(rescale, scale=0.5), "downscale to 0.5x, then back up"),
        Purification("down0.75", partial(rescale, scale=0.75), "downscale to 0.75x, then back"),
        Purification(
            "resize",
            resize_to_model_size,
            "shorter side to the model's size (512 px for SD 1.x, or no model), then back",
            sized=True,
        ),
        Purification("crop20", crop_resize, "cut 20% of each side's length, resize back"),
        Purification("blur", gaussian_blur, "Gaussian blur, sigma 1"),
        Purification("noise", gaussian_noise, "Gaussian noise, sigma 4/255 (seed 0)"),
        Purification("cleaner", adverse_cleaner, "AdverseCleaner-style bilateral+guided filter"),
        Purification("vae", vae_roundtrip, "VAE encode-decode round trip", needs="decoder"),
        Purification("sdedit", sdedit_purify, "SDEdit at t=0.1 with the same model", needs="unet"),
    ]
}


def get_purification(name: str) -> Purification:
    """Look a purification up by name, with an error that lists the valid names."""
    if name not in PURIFICATIONS:
        raise ValueError(f"Unknown purification {name!r}; choose from: {', '.join(PURIFICATIONS)}.")
    return PURIFICATIONS[name]


def parse_purifications(spec: str | Sequence[str]) -> list[Purification]:
    """``"jpeg75,blur"`` -> purifications; ``"all"`` is every one, in registry order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(PURIFICATIONS.values())
    if not names:
        raise ValueError("No purification given; e.g. jpeg75,blur or all.")
    return [get_purification(n) for n in dict.fromkeys(names)]


# --- the surviving latent distortion ------------------------------------------------------------


@torch.no_grad()
def latent_distance(model, a: Tensor, b: Tensor) -> Tensor:
    """||E(a) - E(b)|| per image (posterior means, [0, 1] inputs), shape (N,)."""
    za = model.encode(a.to(model.device, torch.float32) * 2 - 1)
    zb = model.encode(b.to(model.device, torch.float32) * 2 - 1)
    return (za - zb).flatten(1).norm(dim=1).cpu()


def surviving_distortion(
    model, purification: Purification | Callable[[Tensor], Tensor], protected: Tensor, clean: Tensor
) -> Tensor:
    """||E(p(x_adv)) - E(p(x0))|| / ||E(x_adv) - E(x0)|| per image, shape (N,).

    The same purification is applied to both images, so what is measured is how much of the
    latent shift the perturbation caused survives ``p``, not how much ``p`` itself moves E(x).
    A :class:`Purification` that needs a model (VAE round trip, SDEdit) uses ``model`` itself.
    """
    if isinstance(purification, Purification):
        purification = partial(purification, model=model)
    before = latent_distance(model, protected, clean)
    after = latent_distance(model, purification(protected), purification(clean))
    return survival_ratio(after, before)


def survival_ratio(after: Tensor, before: Tensor) -> Tensor:
    """after / before; NaN where before is 0: an image the protection left unchanged has no
    shift that could survive (0 would read as "the purification removed it")."""
    safe = torch.where(before > 0, before, torch.ones_like(before))  # no 0/0 in either branch
    return torch.where(before > 0, after / safe, float("nan"))
