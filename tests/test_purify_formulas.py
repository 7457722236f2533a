"""Purifications against independent references: scipy, OpenCV, Pillow and the formulas.

tests/test_purify.py checks determinism, sizes and the guided filter window by window; this
file checks that each purification computes what its docstring says, with the expected result
computed by another library or by hand.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mimicshield.purify import (
    PURIFICATIONS,
    Purification,
    adverse_cleaner,
    box_mean,
    crop_resize,
    gaussian_blur,
    gaussian_kernel,
    gaussian_noise,
    get_purification,
    jpeg,
    latent_distance,
    parse_purifications,
    rescale,
    resize,
    resize_to_work_size,
    survival_ratio,
    surviving_distortion,
)


def random_images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform [0, 1) float32 images from a seeded numpy generator."""
    return torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))


def pil_bicubic(images: torch.Tensor, size: tuple[int, int], crop=None) -> np.ndarray:
    """Pillow's BICUBIC resize of every (H, W) plane in float ("F") mode to ``size`` = (H, W),
    after ``Image.crop(crop)`` (left, top, right, bottom) if given."""
    planes = images.numpy().reshape(-1, *images.shape[-2:])
    out = []
    for plane in planes:
        image = Image.fromarray(plane, mode="F")
        image = image if crop is None else image.crop(crop)
        out.append(np.asarray(image.resize(size[::-1], Image.BICUBIC)))
    return np.stack(out).reshape(*images.shape[:-2], *size)


# --- Gaussian blur ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.0, 1.7])
def test_gaussian_kernel_is_opencvs_normalised_gaussian(sigma):
    """k_i = exp(-i^2 / (2 sigma^2)) / sum, i in [-r, r], r = ceil(3 sigma): cv2's kernel."""
    import cv2

    kernel = gaussian_kernel(sigma).numpy()
    radius = math.ceil(3 * sigma)
    assert kernel.shape == (2 * radius + 1,)
    want = cv2.getGaussianKernel(2 * radius + 1, sigma, cv2.CV_64F).ravel()
    np.testing.assert_allclose(kernel, want, rtol=1e-6, atol=1e-8)
    explicit = gaussian_kernel(sigma, radius=5).numpy()
    want = cv2.getGaussianKernel(11, sigma, cv2.CV_64F).ravel()
    np.testing.assert_allclose(explicit, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sigma", [1.0, 1.7])
def test_gaussian_blur_is_scipys_gaussian_filter_with_mirrored_borders(sigma):
    """Separable Gaussian of radius ceil(3 sigma); PyTorch's 'reflect' pad (edge not repeated)
    is scipy's 'mirror'. truncate = r / sigma makes scipy use the same radius r."""
    from scipy.ndimage import gaussian_filter

    images = random_images((2, 3, 21, 30), seed=0)
    radius = math.ceil(3 * sigma)
    want = gaussian_filter(
        images.double().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=radius / sigma
    )
    np.testing.assert_allclose(gaussian_blur(images, sigma).numpy(), want, atol=1e-6)
    # the border handling matters: scipy's 'reflect' (edge repeated) is visibly different
    edge_repeated = gaussian_filter(
        images.double().numpy(), sigma=(0, 0, sigma, sigma), mode="reflect", truncate=radius / sigma
    )
    assert np.abs(gaussian_blur(images, sigma).numpy() - edge_repeated).max() > 1e-2


def test_registered_blur_is_sigma_one():
    """The "blur" entry is gaussian_filter(sigma=1, radius 3, mirrored borders)."""
    from scipy.ndimage import gaussian_filter

    images = random_images((1, 3, 16, 19), seed=1)
    want = gaussian_filter(images.double().numpy(), sigma=(0, 0, 1, 1), mode="mirror", truncate=3)
    np.testing.assert_allclose(PURIFICATIONS["blur"](images).numpy(), want, atol=1e-6)


def test_gaussian_blur_mirrors_borders_on_images_smaller_than_the_kernel():
    """A 3 x 20 image, sigma 1 (radius 3): still scipy's 'mirror', as the docstring says."""
    from scipy.ndimage import gaussian_filter

    images = random_images((1, 3, 3, 20), seed=2)
    want = gaussian_filter(images.double().numpy(), sigma=(0, 0, 1, 1), mode="mirror", truncate=3)
    np.testing.assert_allclose(gaussian_blur(images, 1.0).numpy(), want, atol=1e-6)


# --- resampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(10, 15), (40, 70), (13, 44)])
def test_resize_is_pils_bicubic(size):
    """Bicubic, antialiased when shrinking, as Pillow's BICUBIC (a = -0.5, support scaled)."""
    images = random_images((2, 3, 21, 30), seed=3)
    out = resize(images, size)
    assert out.shape == (2, 3, *size)
    np.testing.assert_allclose(out.numpy(), pil_bicubic(images, size), atol=1e-5)


@pytest.mark.parametrize(("name", "scale"), [("down0.5", 0.5), ("down0.75", 0.75)])
def test_rescale_is_pil_down_then_up(name, scale):
    """rescale(x, s) = clip(up(down(x, round(s H) x round(s W)), H x W), 0, 1), as the
    registered down0.5 / down0.75 entries. 28 x 36 gives no rounding ties for either scale."""
    images = random_images((2, 3, 28, 36), seed=4)
    small = (round(28 * scale), round(36 * scale))
    want = np.clip(pil_bicubic(torch.from_numpy(pil_bicubic(images, small)), (28, 36)), 0, 1)
    np.testing.assert_allclose(rescale(images, scale).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(PURIFICATIONS[name](images).numpy(), want, atol=1e-5)


def test_rescale_never_goes_below_one_pixel():
    """A scale that would round a side to 0 keeps 1 pixel: the result is the image's mean
    colour (a 1-pixel bicubic image upsampled is constant)."""
    images = random_images((1, 3, 4, 6), seed=5)
    out = rescale(images, 0.01)
    assert out.shape == images.shape
    want = pil_bicubic(torch.from_numpy(pil_bicubic(images, (1, 1))), (4, 6))
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    assert torch.allclose(out, out[..., :1, :1].expand_as(out))


@pytest.mark.parametrize(("height", "width", "work"), [(30, 45, 20), (45, 30, 20), (24, 36, 512)])
def test_resize_to_work_size_scales_the_shorter_side_and_keeps_the_aspect(height, width, work):
    """Shorter side -> work, the other side scaled by the same factor, then back to H x W."""
    images = random_images((1, 3, height, width), seed=6)
    scale = work / min(height, width)
    small = (round(height * scale), round(width * scale))
    assert min(small) == work
    want = np.clip(pil_bicubic(torch.from_numpy(pil_bicubic(images, small)), (height, width)), 0, 1)
    np.testing.assert_allclose(resize_to_work_size(images, work).numpy(), want, atol=1e-5)
    if work == 512:  # the registry's entry without a model
        np.testing.assert_allclose(PURIFICATIONS["resize"](images).numpy(), want, atol=1e-5)


@pytest.mark.parametrize(("native", "work"), [(None, 512), (768, 768), (1024, 1024)])
def test_the_resize_purification_goes_to_the_models_own_size(native, work):
    """Issue 6: "resize to the model's working size (512 for SD1.x)"; SDXL's is 1024."""

    class Sized:
        native_size = native

    images = random_images((1, 3, 40, 60), seed=8)
    want = resize_to_work_size(images, work)
    np.testing.assert_array_equal(PURIFICATIONS["resize"](images, Sized()).numpy(), want.numpy())
    if native is None:
        np.testing.assert_array_equal(PURIFICATIONS["resize"](images, None).numpy(), want.numpy())


@pytest.mark.parametrize(("height", "width", "fraction"), [(50, 70, 0.2), (40, 60, 0.1)])
def test_crop_resize_cuts_the_fraction_and_resizes_back(height, width, fraction):
    """Half of fraction * side off each border, then bicubic back: Pillow's crop, then resize
    (the crop's edges are the borders: nothing outside it is sampled)."""
    images = random_images((2, 3, height, width), seed=7)
    top, left = round(height * fraction / 2), round(width * fraction / 2)
    assert (top, left) == (height * fraction / 2, width * fraction / 2)  # whole numbers here
    box = (left, top, width - left, height - top)
    want = np.clip(pil_bicubic(images, (height, width), crop=box), 0, 1)
    out = crop_resize(images, fraction)
    assert out.shape == images.shape
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)


def test_crop_resize_removes_exactly_a_border_of_the_cut_width():
    """A ring of fraction/2 of each side around a flat centre: the 20 % crop (crop20) keeps
    only the centre, so the output is flat; a ring one pixel wider is not cut off whole."""
    height, width = 50, 70
    top, left = 5, 7  # 0.2 * 50 / 2, 0.2 * 70 / 2
    ring = torch.ones(1, 3, height, width)
    ring[..., top : height - top, left : width - left] = 0.3
    torch.testing.assert_close(PURIFICATIONS["crop20"](ring), torch.full_like(ring, 0.3))
    wider = torch.ones(1, 3, height, width)
    wider[..., top + 1 : height - top - 1, left + 1 : width - left - 1] = 0.3
    assert (crop_resize(wider, 0.2) - 0.3).abs().max() > 0.1


# --- Gaussian noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [4 / 255, 0.02])
def test_gaussian_noise_has_the_requested_sigma(sigma):
    """On a mid-grey image (no clamping), the added noise is N(0, sigma^2): sample mean within
    6 sigma / sqrt(n), sample std within 6 sigma / sqrt(2 (n - 1)), and a KS test."""
    from scipy.stats import kstest

    images = torch.full((1, 3, 64, 64), 0.5)
    noise = (gaussian_noise(images, sigma, seed=3) - images).double().numpy().ravel()
    n = noise.size
    assert abs(noise.mean()) < 6 * sigma / math.sqrt(n)
    assert abs(noise.std(ddof=1) - sigma) < 6 * sigma / math.sqrt(2 * (n - 1))
    assert kstest(noise / sigma, "norm").pvalue > 1e-3


def test_gaussian_noise_per_image_draw_does_not_depend_on_the_batch():
    """Image i's noise is the same alone, first or last in a batch (each image its own seeded
    generator); another seed gives other noise. The noise does not depend on the content."""
    images = random_images((3, 3, 12, 17), seed=8) * 0.5 + 0.25  # away from the clamp
    batch = gaussian_noise(images, 0.02, seed=5)
    for i in range(3):
        alone = gaussian_noise(images[i : i + 1], 0.02, seed=5)[0]
        assert torch.equal(batch[i], alone)
    reordered = gaussian_noise(images.flip(0), 0.02, seed=5).flip(0)
    assert torch.equal(batch, reordered)
    noise = batch - images
    torch.testing.assert_close(noise[0], noise[2], atol=1e-6, rtol=0)  # same seed, same draw
    assert (gaussian_noise(images, 0.02, seed=6) - batch).abs().max() > 0.01


def test_gaussian_noise_clamps_to_the_unit_range():
    """out = clip(x + sigma z, 0, 1), with z read off a mid-grey probe at a small sigma."""
    images = random_images((2, 3, 16, 16), seed=9)
    probe_sigma, sigma = 0.01, 0.3
    z = (gaussian_noise(torch.full_like(images, 0.5), probe_sigma, seed=0) - 0.5) / probe_sigma
    out = gaussian_noise(images, sigma, seed=0)
    torch.testing.assert_close(out, (images + sigma * z).clamp(0, 1), atol=1e-4, rtol=0)
    assert (out == 0).any() and (out == 1).any()
    # the registered entry: sigma 4/255, seed 0
    z0 = (PURIFICATIONS["noise"](torch.full_like(images, 0.5)) - 0.5) / (4 / 255)
    torch.testing.assert_close(z0, z, atol=1e-3, rtol=0)


# --- JPEG ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in PURIFICATIONS if n.startswith("jpeg")])
def test_jpeg_is_pillows_420_round_trip_at_the_named_quality(name):
    """Rounded to 8 bits, saved by Pillow as JPEG at quality q with 4:2:0 chroma, decoded:
    the purified pixels are exactly those bytes / 255."""
    quality = int(name.removeprefix("jpeg"))
    images = random_images((2, 3, 21, 30), seed=10)
    out = PURIFICATIONS[name](images)
    torch.testing.assert_close(out, jpeg(images, quality), atol=0, rtol=0)
    for image, purified in zip(images.numpy(), out, strict=True):
        pixels = np.rint(np.clip(image, 0, 1) * np.float32(255)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0)).save(
            buffer, format="JPEG", quality=quality, subsampling="4:2:0"
        )
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        got = (purified.permute(1, 2, 0).double() * 255).numpy()
        np.testing.assert_allclose(got, decoded.astype(np.float64), atol=1e-4, rtol=0)


# --- AdverseCleaner -----------------------------------------------------------------------------


def reference_box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """scipy's uniform filter over (2r+1)^2 windows with 'reflect' (edge repeated) borders."""
    from scipy.ndimage import uniform_filter

    size = (2 * radius + 1, 2 * radius + 1) + (1,) * (x.ndim - 2)
    return uniform_filter(x.astype(np.float64), size=size, mode="reflect")


def reference_guided_filter(guide, source, radius, eps):
    """He et al., Eq. 19-21, built on scipy box means: q = mean(a)^T I + mean(b)."""
    guide, source = guide.astype(np.float64), source.astype(np.float64)
    mean_i, mean_p = reference_box_mean(guide, radius), reference_box_mean(source, radius)
    outer_ii = guide[..., :, None] * guide[..., None, :]
    outer_ip = guide[..., :, None] * source[..., None, :]
    sigma = reference_box_mean(outer_ii, radius) - mean_i[..., :, None] * mean_i[..., None, :]
    cov = reference_box_mean(outer_ip, radius) - mean_i[..., :, None] * mean_p[..., None, :]
    a = np.linalg.solve(sigma + eps * np.eye(3), cov)
    b = mean_p - np.einsum("hwjc,hwj->hwc", a, mean_i)
    mean_a, mean_b = reference_box_mean(a, radius), reference_box_mean(b, radius)
    return np.einsum("hwjc,hwj->hwc", mean_a, guide) + mean_b


def test_box_mean_is_a_uniform_filter_with_edge_repeating_borders():
    """cv2.boxFilter(BORDER_REFLECT) = scipy uniform_filter(mode='reflect'), on a float image."""
    x = np.random.default_rng(11).random((9, 13, 3)) * 255
    for radius in (1, 2, 4):
        np.testing.assert_allclose(box_mean(x, radius), reference_box_mean(x, radius), atol=1e-9)


def test_adverse_cleaner_is_bilateral_passes_then_guided_filters_steered_by_the_input():
    """Defaults (the registered "cleaner"): 64 cv2.bilateralFilter(d=5, 8, 8) passes on the
    8-bit image, then 4 guided filters (r=4, eps=16) with the original as guide, rounded to
    8 bits after each pass."""
    import cv2

    images = random_images((2, 3, 20, 24), seed=12)
    out = PURIFICATIONS["cleaner"](images)
    torch.testing.assert_close(out, adverse_cleaner(images), atol=0, rtol=0)
    for image, cleaned in zip(images.numpy(), out, strict=True):
        original = np.rint(image.transpose(1, 2, 0) * np.float32(255)).astype(np.uint8)
        smoothed = np.ascontiguousarray(original)
        for _ in range(64):
            smoothed = cv2.bilateralFilter(smoothed, 5, 8.0, 8.0)
        for _ in range(4):
            filtered = reference_guided_filter(original, smoothed, 4, 16.0)
            smoothed = np.clip(np.rint(filtered), 0, 255).astype(np.uint8)
        got = (cleaned.permute(1, 2, 0).double() * 255).numpy()
        np.testing.assert_allclose(got, smoothed.astype(np.float64), atol=1e-4, rtol=0)


# --- surviving latent distortion ----------------------------------------------------------------


class LinearEncoder:
    """A stand-in model whose "encoder" is an affine map of the flattened image."""

    device = torch.device("cpu")

    def __init__(self, shape: tuple[int, int, int], latent: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(latent, math.prod(shape), generator=g, dtype=torch.float64)
        self.bias = torch.randn(latent, generator=g, dtype=torch.float64)
        self.calls: list[tuple[torch.Tensor, object]] = []

    def encode(self, x: torch.Tensor, posterior_noise=None) -> torch.Tensor:
        self.calls.append((x, posterior_noise))
        z = x.double().flatten(1) @ self.weight.T + self.bias
        return z.view(x.shape[0], 4, 2, -1).float()


def test_latent_distance_is_the_per_image_l2_norm_of_the_encoded_difference():
    """||E(2a - 1) - E(2b - 1)||_2 per image, from the posterior mean (no noise)."""
    model = LinearEncoder((3, 8, 8))
    a, b = random_images((3, 3, 8, 8), seed=13), random_images((3, 3, 8, 8), seed=14)
    w, bias = model.weight.numpy(), model.bias.numpy()
    za = (2 * a.double().numpy().reshape(3, -1) - 1) @ w.T + bias
    zb = (2 * b.double().numpy().reshape(3, -1) - 1) @ w.T + bias
    want = np.linalg.norm(za - zb, axis=1)
    got = latent_distance(model, a, b)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert all(noise is None for _, noise in model.calls)
    assert all(x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 for x, _ in model.calls)


def test_surviving_distortion_of_a_half_way_purification_is_one_half():
    """With a linear E and p(x) = x0 + (x - x0) / 2: E(p(x_adv)) - E(p(x0)) is half of
    E(x_adv) - E(x0), so the ratio is exactly 0.5 for every image; identity gives 1."""
    model = LinearEncoder((3, 8, 8), seed=1)
    clean = random_images((3, 3, 8, 8), seed=15)
    shift = (random_images((3, 3, 8, 8), seed=16) - 0.5) * torch.tensor([0.02, 0.1, 0.3]).view(
        3, 1, 1, 1
    )
    protected = clean + shift
    half_way = Purification("half", lambda x: clean + 0.5 * (x - clean), "half way to x0")
    for purification in (half_way, half_way.fn):
        got = surviving_distortion(model, purification, protected, clean)
        torch.testing.assert_close(got, torch.full((3,), 0.5), atol=1e-5, rtol=0)
    identity = surviving_distortion(model, lambda x: x, protected, clean)
    torch.testing.assert_close(identity, torch.ones(3), atol=1e-5, rtol=0)


def test_surviving_distortion_passes_the_model_to_purifications_that_need_one():
    """A Purification with needs="decoder" is called as fn(images, model) with that model."""
    model = LinearEncoder((3, 8, 8), seed=2)
    seen = []

    def scale_by_a_quarter(images, m):
        seen.append(m)
        return 0.25 * images

    quarter = Purification("quarter", scale_by_a_quarter, "x / 4", needs="decoder")
    clean = random_images((2, 3, 8, 8), seed=17)
    protected = clean * 0.9
    got = surviving_distortion(model, quarter, protected, clean)
    torch.testing.assert_close(got, torch.full((2,), 0.25), atol=1e-5, rtol=0)
    assert seen and all(m is model for m in seen)


def test_survival_ratio_is_after_over_before_and_nan_only_where_before_is_zero():
    """after / before per image; NaN where before == 0, whatever after is."""
    after = torch.tensor([1.0, 0.0, 3.0, 0.0])
    before = torch.tensor([2.0, 4.0, 0.0, 0.0])
    got = survival_ratio(after, before)
    torch.testing.assert_close(got[:2], torch.tensor([0.5, 0.0]))
    assert torch.isnan(got[2:]).all()
    # per image in surviving_distortion: one unchanged image does not spoil the others
    model = LinearEncoder((3, 8, 8), seed=3)
    clean = random_images((2, 3, 8, 8), seed=18)
    protected = torch.stack([clean[0], clean[1] * 0.8])
    mixed = surviving_distortion(model, lambda x: x, protected, clean)
    assert torch.isnan(mixed[0]) and abs(mixed[1].item() - 1) < 1e-5


def test_survival_ratio_is_after_over_before_for_tiny_positive_distances():
    """after / before holds for any before > 0, e.g. 1e-14 / 2e-14 = 0.5."""
    got = survival_ratio(torch.tensor([1e-14]), torch.tensor([2e-14]))
    torch.testing.assert_close(got, torch.tensor([0.5]))


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PURIFICATIONS))
def test_every_registered_name_parses_to_its_callable_purification(name):
    """parse_purifications(name) == [PURIFICATIONS[name]], named name, with a callable fn."""
    (parsed,) = parse_purifications(name)
    assert parsed is PURIFICATIONS[name] is get_purification(name)
    assert parsed.name == name and callable(parsed.fn) and callable(parsed)
    assert parsed.needs in (None, "decoder", "unet") and parsed.summary


def test_parse_purifications_accepts_sequences_and_rejects_unknown_or_empty_specs():
    """A list works like the comma string; an unknown name is named in a ValueError that lists
    the valid ones; an empty spec is refused."""
    assert parse_purifications([" blur", "jpeg75 ", "blur"]) == [
        PURIFICATIONS["blur"],
        PURIFICATIONS["jpeg75"],
    ]
    with pytest.raises(ValueError, match="'bogus'") as error:
        parse_purifications("blur,bogus")
    assert all(name in str(error.value) for name in PURIFICATIONS)
    with pytest.raises(ValueError, match="'jpeg50'"):
        parse_purifications(["jpeg50"])
    for empty in ("", " , ", []):
        with pytest.raises(ValueError, match="No purification given"):
            parse_purifications(empty)
