"""Independent checks of small formulas: the fine-tuning loss and its batches, tile blending and
seeds, EOT's parameter ranges, the bench's reference step against the engine, ``fit_image``,
the built-in target pattern and the web app's amplified perturbation.

Every expectation is derived here from the documented formula (or replayed from the same seeded
draws), never copied from a run of the code under test.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from fake_engines import NoiseEngine, TilePainter

from mimicshield import robust
from mimicshield.bench import (
    BENCH_PROMPT,
    architecture,
    bench_images,
    build_engine_model,
    build_reference_model,
    reference_loss_direction,
    reference_sds_direction,
)
from mimicshield.methods import METHODS, StepInputs
from mimicshield.mimicry import _batches, _denoising_loss, fit_image
from mimicshield.purify import NOISE_SIGMA
from mimicshield.resolution import _ramp, protect_tiled, tile_starts
from mimicshield.targets import target_pattern
from mimicshield.webapp import amplify

# --- shared tiny networks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets():
    """The engine's model and the reference configuration, built from the same seed (so the
    same random weights), on the tiny architecture, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    arch, cpu = architecture(tiny=True), torch.device("cpu")
    yield build_engine_model(arch, cpu, torch.float32), build_reference_model(arch, cpu)
    torch.set_num_threads(threads)


def _sd1_alphas_cumprod() -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), SD 1.x's "scaled_linear" betas: the square of a
    linspace from sqrt(0.00085) to sqrt(0.012) over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# --- 1. _denoising_loss for an epsilon model ------------------------------------------------------


def test_denoising_loss_of_an_epsilon_model_is_the_mse_to_the_replayed_noise(nets):
    """L = mean((eps_theta(z_t, t, c) - n)^2), z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) n,
    z0 = s (mu + sigma p), with p, t, n drawn from the generator in that order."""
    model, _ = nets
    assert model.prediction_type == "epsilon"
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    cond = model.embed_prompt(BENCH_PROMPT).expand(2, -1, -1)
    loss = _denoising_loss(model, images, cond, torch.Generator().manual_seed(7))

    replay = torch.Generator().manual_seed(7)
    shape = (2, 4, 32 // 8, 48 // 8)  # 4 latent channels, the VAE downsamples by 8
    posterior = torch.randn(shape, generator=replay)
    t = torch.randint(0, 1000, (2,), generator=replay)
    noise = torch.randn(shape, generator=replay)
    with torch.no_grad():
        dist = model.vae.encode(images * 2 - 1).latent_dist
        z0 = 0.18215 * (dist.mean + dist.std * posterior)
        abar = _sd1_alphas_cumprod()[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        eps_hat = model.unet(z_t, t, encoder_hidden_states=cond).sample
    expected = ((eps_hat - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


# --- 2. _batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "batch_size", "epochs"), [(5, 1, 3), (6, 2, 4), (5, 2, 4)])
def test_batches_see_every_image_equally_often_over_whole_epochs(count, batch_size, epochs):
    """Shuffled epochs: over k * count / batch_size steps every index appears exactly k times;
    each batch holds batch_size valid indices, distinct unless it straddles two epochs."""
    steps = epochs * count // batch_size
    batches = list(_batches(count, batch_size, steps, torch.Generator().manual_seed(3)))
    assert len(batches) == steps
    assert all(len(b) == batch_size and all(0 <= i < count for i in b) for b in batches)
    assert Counter(i for b in batches for i in b) == {i: epochs for i in range(count)}
    for step, batch in enumerate(batches):
        first, last = step * batch_size, (step + 1) * batch_size - 1
        if first // count == last // count:  # inside one epoch: a permutation's slice
            assert len(set(batch)) == batch_size


def test_batches_are_consecutive_slices_of_seeded_permutations():
    """The index stream is randperm(count) after randperm(count) from the one generator, cut
    into batch_size pieces; it depends on the generator's seed only, not on torch's global RNG."""
    count, batch_size, steps = 7, 3, 9
    replay = torch.Generator().manual_seed(11)
    stream = [i for _ in range(4) for i in torch.randperm(count, generator=replay).tolist()]
    expected = [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
    torch.manual_seed(0)
    first = list(_batches(count, batch_size, steps, torch.Generator().manual_seed(11)))
    torch.manual_seed(12345)
    second = list(_batches(count, batch_size, steps, torch.Generator().manual_seed(11)))
    assert first == second == expected
    other = list(_batches(count, batch_size, steps, torch.Generator().manual_seed(12)))
    assert other != first


def test_batches_are_full_even_when_the_batch_is_larger_than_the_image_set():
    """Each of the ``steps`` batches holds batch_size indices, also when batch_size > count."""
    batches = list(_batches(2, 3, 4, torch.Generator().manual_seed(0)))
    assert all(len(b) == 3 for b in batches)


# --- 3. tile blending and seeds ------------------------------------------------------------------


def _expected_ramp(start: int, tile: int, length: int, overlap: int) -> list[float]:
    """1 inside; over the first ``overlap`` px (if a tile precedes) it rises (j+1)/(overlap+1),
    over the last ``overlap`` px (if one follows) it falls symmetrically."""
    weights = []
    for j in range(tile):
        w = 1.0
        if start > 0 and j < overlap:
            w = min(w, (j + 1) / (overlap + 1))
        if start + tile < length and j >= tile - overlap:
            w = min(w, (tile - j) / (overlap + 1))
        weights.append(w)
    return weights


@pytest.mark.parametrize(
    ("start", "tile", "length", "overlap"),
    [(0, 64, 64, 16), (0, 64, 200, 16), (68, 64, 200, 16), (136, 64, 200, 16), (40, 24, 100, 16)],
)
def test_ramp_is_one_inside_and_linear_over_the_overlaps(start, tile, length, overlap):
    """w_j = min(1, (j+1)/(o+1) after a neighbour, (T-j)/(o+1) before one)."""
    weight = _ramp(start, tile, length, overlap)
    torch.testing.assert_close(
        weight, torch.tensor(_expected_ramp(start, tile, length, overlap)), rtol=0, atol=1e-7
    )
    assert weight.min() > 0
    if tile >= 2 * overlap:  # else the two ramps meet below 1 (the narrow-tile case)
        assert weight.max() == 1


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (56, 8), (1024, 64)])
def test_tile_weights_sum_to_at_least_one_everywhere(tile, overlap):
    """Neighbours overlapping by O >= o px: where one falls and the next rises the weights add
    to (O + 1) / (o + 1) >= 1, and 1 where one tile covers alone; so the blend never divides by
    a vanishing sum."""
    for length in range(tile, 5 * tile, 7):
        total = torch.zeros(length)
        for start in tile_starts(length, tile, overlap):
            total[start : start + tile] += _ramp(start, tile, length, overlap)
        assert total.min() >= 1 - 1e-6, length


class SeedRecorder(NoiseEngine):
    """A NoiseEngine that records, for each tile it gets, (image, y, x) decoded from the
    position-coded input, and the seed the tile is protected with (the config's when None)."""

    def __init__(self, height: int, width: int, **config) -> None:
        super().__init__(**config)
        self.size = (height, width)
        self.tiles: list[tuple[int, int, int, int]] = []

    def protect(self, images, *, seeds=None, callback=None):
        used = [self.config.seed] * len(images) if seeds is None else list(seeds)
        height, width = self.size
        for tile, seed in zip(images, used, strict=True):
            image = round(float(tile[2, 0, 0]) * 8)
            y, x = round(float(tile[0, 0, 0]) * height), round(float(tile[1, 0, 0]) * width)
            self.tiles.append((image, y, x, int(seed)))
        return super().protect(images, seeds=seeds, callback=callback)


def _position_coded(count: int, height: int, width: int) -> torch.Tensor:
    """Channel 0 = y / H, channel 1 = x / W, channel 2 = image index / 8."""
    y = torch.arange(height, dtype=torch.float64).view(-1, 1) / height
    x = torch.arange(width, dtype=torch.float64).view(1, -1) / width
    coords = torch.stack([y.expand(height, width), x.expand(height, width)]).float()
    return torch.stack(
        [torch.cat([coords, torch.full((1, height, width), i / 8)]) for i in range(count)]
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_tile_k_is_protected_with_seed_plus_k_in_every_image(batch_size):
    """Tiles in raster order k = 0, 1, ... get seed + k, the same k in every image."""
    height, width, seed = 96, 160, 7
    engine = SeedRecorder(height, width, seed=seed)
    protect_tiled(engine, _position_coded(2, height, width), tile_size=64, batch_size=batch_size)
    corners = sorted({(y, x) for _, y, x, _ in engine.tiles})
    assert len(corners) > 1 and len(engine.tiles) == 2 * len(corners)  # each tile once per image
    assert {i for i, *_ in engine.tiles} == {0, 1}
    for _, y, x, used in engine.tiles:
        assert used == seed + corners.index((y, x))


def test_one_tile_is_protected_with_the_configured_seed():
    """A single tile is tile 0: seed + 0 for every image."""
    engine = SeedRecorder(32, 40, seed=5)
    protect_tiled(engine, _position_coded(3, 32, 40), tile_size=64, batch_size=3)
    assert [(i, y, x, s) for i, y, x, s in engine.tiles] == [(i, 0, 0, 5) for i in range(3)]


def test_tiled_perturbation_is_the_weight_normalised_blend_of_the_tiles():
    """delta = sum_k w_k (adv_k - x_k) / sum_k w_k, w_k = ramp_y * ramp_x; TilePainter paints
    tile k with +eps for an even seed + k and -eps for an odd one."""
    height, width, seed, eps = 96, 160, 3, 8 / 255
    recorder = SeedRecorder(height, width, seed=seed)
    protect_tiled(recorder, _position_coded(1, height, width), tile_size=64)
    tiles = [(y, x, s) for _, y, x, s in recorder.tiles]
    painter = TilePainter(seed=seed, eps=eps)
    delta = protect_tiled(painter, torch.full((1, 3, height, width), 0.5), tile_size=64)
    tile_h, tile_w = painter.shapes[0][-2:]
    # ramps of a quarter of the 64 px tile size (a multiple of 8, at most TILE_OVERLAP = 64),
    # chosen before the tiles are balanced down to 56 px
    overlap = 16
    numerator = torch.zeros(height, width, dtype=torch.float64)
    denominator = torch.zeros(height, width, dtype=torch.float64)
    for y, x, s in tiles:
        wy = torch.tensor(_expected_ramp(y, tile_h, height, overlap), dtype=torch.float64)
        wx = torch.tensor(_expected_ramp(x, tile_w, width, overlap), dtype=torch.float64)
        w = wy[:, None] * wx[None, :]
        sign = 1.0 if s % 2 == 0 else -1.0
        numerator[y : y + tile_h, x : x + tile_w] += w * sign * eps
        denominator[y : y + tile_h, x : x + tile_w] += w
    expected = (numerator / denominator).float().expand(3, height, width)
    torch.testing.assert_close(delta[0], expected, rtol=0, atol=1e-6)


# --- 4. EOT parameters ----------------------------------------------------------------------------


def _recorded_parameters(monkeypatch, draws: int = 2000) -> dict[str, list[float]]:
    """Draw each parametrised transform ``draws`` times from one seeded generator and record
    the parameter it calls its purification with."""
    seen: dict[str, list[float]] = {"jpeg": [], "resize": [], "blur": []}
    monkeypatch.setattr(robust, "differentiable_jpeg", lambda x, q: seen["jpeg"].append(q) or x)
    monkeypatch.setattr(robust, "rescale", lambda x, s: seen["resize"].append(s) or x)
    monkeypatch.setattr(robust, "gaussian_blur", lambda x, s: seen["blur"].append(s) or x)
    x = torch.zeros(1, 3, 8, 8)
    for name in seen:
        generator = torch.Generator().manual_seed(2024)
        for _ in range(draws):
            robust.ROBUST_TRANSFORMS[name](generator, x.shape[1:])(x)
    return seen


def test_eot_jpeg_quality_is_an_integer_in_60_95_both_ends_included(monkeypatch):
    """quality ~ U{60, ..., 95}: 2000 draws hit every one of the 36 values (each is missed with
    probability (35/36)^2000, about 1e-25)."""
    qualities = _recorded_parameters(monkeypatch)["jpeg"]
    assert robust.JPEG_QUALITY == (60, 95)
    assert all(isinstance(q, int) for q in qualities)
    assert set(qualities) == set(range(60, 96))


def test_eot_resize_scale_and_blur_sigma_stay_in_their_ranges_and_fill_them(monkeypatch):
    """scale ~ U[0.5, 1), sigma ~ U[0.5, 1.5): every draw inside; with 2000 draws the extremes
    come within 1% of the range's width of both ends (missed with probability ~e^-20)."""
    seen = _recorded_parameters(monkeypatch)
    for name, (low, high) in (("resize", (0.5, 1.0)), ("blur", (0.5, 1.5))):
        values = torch.tensor(seen[name], dtype=torch.float64)
        assert len(values) == 2000
        assert values.min() >= low and values.max() < high, name
        width = high - low
        assert values.min() < low + 0.01 * width and values.max() > high - 0.01 * width, name
        assert abs(float(values.mean()) - (low + high) / 2) < 5 * width / math.sqrt(12 * 2000)
    assert robust.RESIZE_SCALE == (0.5, 1.0) and robust.BLUR_SIGMA == (0.5, 1.5)


def test_eot_noise_adds_unclamped_gaussian_noise_of_sigma_4_over_255():
    """T(x) = x + sigma n, n ~ N(0, I) from the image's generator, sigma = 4/255, no clamping."""
    assert pytest.approx(4 / 255) == NOISE_SIGMA
    shape = (3, 16, 16)
    generator, replay = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ones = torch.ones(1, *shape)
    added = []
    for _ in range(50):
        out = robust.ROBUST_TRANSFORMS["noise"](generator, shape)(ones)
        torch.testing.assert_close(out, ones + NOISE_SIGMA * torch.randn(shape, generator=replay))
        added.append(out - ones)
    noise = torch.cat(added).double()
    n = noise.numel()
    assert abs(float(noise.std()) / NOISE_SIGMA - 1) < 0.03  # std error ~ 1/sqrt(2n) = 0.4%
    assert abs(float(noise.mean())) < 5 * NOISE_SIGMA / math.sqrt(n)
    assert (torch.cat(added) + 1).max() > 1  # not clamped to [0, 1]


def test_eot_picks_every_transform_about_equally_often(monkeypatch):
    """index ~ U{0, ..., len(names) - 1}: 1000 draws over 5 names, each within 5 binomial
    standard deviations (sqrt(1000 * 0.2 * 0.8) ~ 12.6) of 200."""
    picked: list[str] = []
    for name in robust.ROBUST_TRANSFORMS:
        original = robust.ROBUST_TRANSFORMS[name]

        def recording(generator, shape, name=name, original=original):
            picked.append(name)
            return original(generator, shape)

        monkeypatch.setitem(robust.ROBUST_TRANSFORMS, name, recording)
    eot = robust.EOT(list(robust.ROBUST_TRANSFORMS), [0])
    for _ in range(1000):
        eot.draw((3, 8, 8))
    counts = Counter(picked)
    assert set(counts) == set(robust.ROBUST_TRANSFORMS)
    assert all(abs(c - 200) < 5 * math.sqrt(1000 * 0.2 * 0.8) for c in counts.values()), counts


def test_eot_sequence_of_draws_follows_each_seed_whatever_the_batch():
    """Image with seed s sees the same transform at step i whether it is batched with others,
    in another order, or alone: each image draws from its own generator."""
    shape = (3, 16, 16)
    images = {
        s: torch.rand(shape, generator=torch.Generator().manual_seed(s)) * 1.8 - 0.9
        for s in (2, 5, 9)
    }
    names = list(robust.ROBUST_TRANSFORMS)
    outputs: dict[tuple[int, ...], dict[int, list[torch.Tensor]]] = {}
    for order in ((5, 9, 2), (2, 5), (9,)):
        eot = robust.EOT(names, list(order))
        x = torch.stack([images[s] for s in order])
        steps = [eot.draw(shape)(x) for _ in range(4)]
        outputs[order] = {s: [step[i] for step in steps] for i, s in enumerate(order)}
    for seed in (2, 5, 9):
        runs = [per_seed[seed] for per_seed in outputs.values() if seed in per_seed]
        assert len(runs) >= 1
        for run in runs[1:]:
            for a, b in zip(runs[0], run, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the steps do differ: a fresh transform each step
    assert any(not torch.equal(a, outputs[(5, 9, 2)][5][0]) for a in outputs[(5, 9, 2)][5][1:])


# --- 5. the bench's reference step against the engine --------------------------------------------


def _step_case():
    """A batch-1 image, a point near it, the built-in target, all in [-1, 1]."""
    x0 = bench_images(1, 32, seed=0) * 2 - 1
    bump = torch.rand(x0.shape, generator=torch.Generator().manual_seed(3)) * 0.1 - 0.05
    return x0, (x0 + bump).clamp(-1, 1), target_pattern(32, 32)[None] * 2 - 1


@pytest.mark.parametrize("method", ["advdm+", "mist", "photoguard"])
def test_reference_loss_direction_equals_the_engines_for_the_same_draws(nets, method):
    """The reference draws from the global RNG: posterior of x, t, n (for L_S at x), then the
    target's posterior, t and n. Replayed into StepInputs (target_latent = E(y) with the target's
    posterior draw), the engine's direction has the same values, hence the same signs."""
    model, ref = nets
    x0, x, target = _step_case()
    shape = (1, *model.latent_shape(32, 32))
    with torch.random.fork_rng():
        torch.manual_seed(11)
        expected = reference_loss_direction(ref, method, x, x0, target)
        torch.manual_seed(11)
        posterior, t, noise = torch.randn(shape), torch.randint(0, 1000, (1,)), torch.randn(shape)
        target_posterior = torch.randn(shape)
    with torch.no_grad():
        target_latent = model.encode(target, target_posterior)
    inputs = StepInputs(
        t=t,
        noise=noise,
        cond=model.condition(BENCH_PROMPT, 1, 32, 32),
        posterior_noise=posterior,
        target_latent=target_latent,
    )
    direction = METHODS[method].direction(model, x, inputs)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(direction, expected, rtol=1e-4, atol=1e-5 * scale)
    clear = expected.abs() > 1e-3 * scale
    assert torch.equal(direction.sign()[clear], expected.sign()[clear])


def _sds_replay(model, seed: int):
    """The reference SDS loop's draws from the global RNG: posterior p1, t, n, then p2 for the
    encoder's second (gradient) pass."""
    shape = (1, *model.latent_shape(32, 32))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        p1 = torch.randn(shape)
        t = torch.randint(0, 1000, (1,))
        n = torch.randn(shape)
        p2 = torch.randn(shape)
    return p1, t, n, p2


def test_reference_sds_direction_is_the_vjp_at_a_second_posterior_draw(nets):
    """reference sds- = -(dE(x; p2)/dx)^T (eps_hat(E(x; p1)) - n): the residual from one
    posterior sample, the vector-Jacobian product at a fresh one (Diff-Protect's pgd_sds encodes
    X_adv again, sampling again)."""
    model, ref = nets
    _, x, target = _step_case()
    with torch.random.fork_rng():
        torch.manual_seed(11)
        expected = reference_sds_direction(ref, "sds-", x, target)
    p1, t, n, p2 = _sds_replay(model, 11)
    cond = model.condition(BENCH_PROMPT, 1, 32, 32)
    with torch.no_grad():
        abar = _sd1_alphas_cumprod()[t].view(-1, 1, 1, 1)
        z1 = model.encode(x, p1)
        residual = model.predict_noise(abar.sqrt() * z1 + (1 - abar).sqrt() * n, t, cond) - n
    xg = x.detach().requires_grad_(True)
    (vjp,) = torch.autograd.grad(model.encode(xg, p2), xg, grad_outputs=residual)
    scale = float(expected.abs().max())
    torch.testing.assert_close(-vjp, expected, rtol=1e-4, atol=1e-5 * scale)


# --- 6. fit_image -------------------------------------------------------------------------------


def _bicubic(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(
        image[None], size=size, mode="bicubic", antialias=True, align_corners=False
    )[0].clamp(0, 1)


@pytest.mark.parametrize(
    ("shape", "resolution", "resized", "top", "left"),
    [
        # shorter side 45 -> 32: 70 * 32 / 45 = 49.8 -> 50; (50 - 32) // 2 = 9
        ((45, 70), 32, (32, 50), 0, 9),
        ((70, 45), 32, (50, 32), 9, 0),
        # upscaled: 20 -> 32 is x1.6, 30 -> 48; (48 - 32) // 2 = 8
        ((20, 30), 32, (32, 48), 0, 8),
        # the shorter side already 32: no resize, 41 -> a centred 32 crop from (41 - 32) // 2 = 4
        ((32, 41), 32, None, 0, 4),
    ],
)
def test_fit_image_resizes_the_shorter_side_then_crops_the_centre(
    shape, resolution, resized, top, left
):
    """Bicubic (antialiased) resize with the shorter side at ``resolution``, then the centred
    ``resolution`` square."""
    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(4))
    scaled = image if resized is None else _bicubic(image, resized)
    expected = scaled[:, top : top + resolution, left : left + resolution]
    fitted = fit_image(image, resolution)
    assert fitted.shape == (3, resolution, resolution)
    torch.testing.assert_close(fitted, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "crop", "top", "left"),
    [((45, 70), (40, 64), 2, 3), ((70, 45), (64, 40), 3, 2), ((48, 56), (48, 56), 0, 0)],
)
def test_fit_image_at_native_size_crops_the_centre_to_multiples_of_8(shape, crop, top, left):
    """resolution 0: no resampling; each side cut to a multiple of 8 around the centre
    (45 -> 40 from row (45 - 40) // 2 = 2, 70 -> 64 from column 3)."""
    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(5))
    fitted = fit_image(image, 0)
    assert torch.equal(fitted, image[:, top : top + crop[0], left : left + crop[1]])
    with pytest.raises(ValueError, match="smaller than 8"):
        fit_image(torch.rand(3, 7, 30), 0)


# --- 7. target_pattern ----------------------------------------------------------------------------


def _energy_fraction(channel: torch.Tensor, shortest: float, longest: float) -> float:
    """The share of a channel's AC spectral energy at spatial periods in [shortest, longest]."""
    height, width = channel.shape
    energy = torch.fft.fft2(channel - channel.mean()).abs().pow(2)
    fy = torch.fft.fftfreq(height).view(-1, 1)
    fx = torch.fft.fftfreq(width).view(1, -1)
    period = 1 / torch.sqrt(fy**2 + fx**2).clamp(min=1e-12)
    band = (period >= shortest) & (period <= longest)
    return float(energy[band].sum() / energy.sum())


def test_target_pattern_is_a_deterministic_high_contrast_colour_texture():
    """(3, H, W) in [0, 1], the same on every call, made of sign() outputs: every value is 0, 1
    (or 0.5 where the sum is exactly 0); each channel half dark, half light; channels differ."""
    pattern = target_pattern(72, 104)
    assert pattern.shape == (3, 72, 104) and pattern.dtype == torch.float32
    assert torch.equal(pattern, target_pattern(72, 104))
    assert pattern.min() >= 0 and pattern.max() <= 1
    assert set(pattern.unique().tolist()) <= {0.0, 0.5, 1.0}
    assert ((pattern == 0) | (pattern == 1)).float().mean() > 0.99
    for channel in pattern:
        assert 0.3 < float(channel.mean()) < 0.7
    assert not torch.equal(pattern[0], pattern[1]) and not torch.equal(pattern[1], pattern[2])


def test_target_pattern_periods_are_in_pixels_and_coarser_than_a_latent_pixel():
    """Defined in pixel units (periods 12-48 px), so its texture survives the VAE's 8x
    downsampling at any size: at 96x160 and at 288x480 most of each channel's energy lies at
    periods of 8 px or more, and the share in the 12-48 px band does not change with the size
    (a pattern scaled to the image would move 3x in period)."""
    small, large = target_pattern(96, 160), target_pattern(288, 480)
    for a, b in zip(small, large, strict=True):
        assert _energy_fraction(a, 8, math.inf) > 0.5
        assert _energy_fraction(b, 8, math.inf) > 0.5
        assert abs(_energy_fraction(a, 12, 48) - _energy_fraction(b, 12, 48)) < 0.1


# --- 8. the web app's amplified perturbation -----------------------------------------------------


def test_amplify_maps_minus_eps_zero_plus_eps_to_black_grey_white_linearly():
    """0.5 + (protected - clean) / (2 eps), clamped to [0, 1]: grey is unchanged, black and
    white are -eps and +eps, linear between, saturated beyond."""
    eps = 8 / 255
    clean = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.25
    for d, grey in ((0.0, 0.5), (eps, 1.0), (-eps, 0.0), (eps / 2, 0.75), (-eps / 4, 0.375)):
        out = amplify(clean + d, clean, eps)
        torch.testing.assert_close(out, torch.full_like(clean, grey), rtol=0, atol=1e-5)
    for d, grey in ((2 * eps, 1.0), (-3 * eps, 0.0)):
        assert torch.equal(amplify(clean + d, clean, eps), torch.full_like(clean, grey))
    # per pixel, not per image: a mixed perturbation keeps each pixel's own value
    d = (torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(7)) * 2 - 1) * eps
    torch.testing.assert_close(
        amplify(clean + d, clean, eps), 0.5 + d / (2 * eps), atol=1e-5, rtol=0
    )


def test_size_problem_only_at_resolution_0():
    """A tiny image is resized to the model's size by default (None) or to N: only
    resolution 0, which keeps each image's own size, refuses it."""
    from mimicshield.mimicry import size_problem

    assert size_problem(4, 4, None) is None and size_problem(4, 4, 64) is None
    assert "4x7 is smaller than 8 pixels a side" in size_problem(4, 7, 0)
    assert size_problem(8, 8, 0) is None
