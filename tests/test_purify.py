"""Purifications: deterministic, size-keeping, and the surviving-distortion ratio's edge cases."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import WEIGHTS, requires_assets

from mimicshield.purify import (
    PURIFICATIONS,
    NotApplicableError,
    gaussian_noise,
    get_purification,
    guided_filter,
    jpeg,
    parse_purifications,
    sdedit_purify,
    surviving_distortion,
    vae_roundtrip,
)

MODEL_FREE = [name for name, p in PURIFICATIONS.items() if p.needs is None]


@pytest.fixture(scope="module")
def odd_images() -> torch.Tensor:
    """Two smooth-ish images of an odd size (not a multiple of 2 or 8), on the 8-bit grid."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 3, 5, 7, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(37, 53), mode="bilinear")
    return ((smooth + 0.05 * torch.rand(2, 3, 37, 53, generator=g)).clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def tiny_decoder_model(tiny_model_dir):
    from mimicshield.models import load_models

    return load_models(str(tiny_model_dir), device="cpu", dtype="fp32", with_decoder=True)


@pytest.mark.parametrize("name", MODEL_FREE)
def test_purification_is_deterministic_and_keeps_size(odd_images, name):
    p = get_purification(name)
    first, second = p(odd_images), p(odd_images.clone())
    assert first.shape == odd_images.shape
    assert first.dtype == odd_images.dtype
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.equal(first, odd_images)  # every purification changes something


@pytest.mark.parametrize("name", ["vae", "sdedit"])
def test_model_purifications_are_deterministic_and_keep_size(tiny_decoder_model, name):
    images = torch.rand(1, 3, 19, 27, generator=torch.Generator().manual_seed(1))
    p = get_purification(name)
    assert p.applicable(tiny_decoder_model)
    # SDEdit's maths is the same at any strength; 0.02 runs 2 UNet calls instead of 10
    run = partial(sdedit_purify, strength=0.02) if name == "sdedit" else p
    first, second = run(images, tiny_decoder_model), run(images, tiny_decoder_model)
    assert first.shape == images.shape
    assert torch.equal(first, second)


def test_model_purifications_refuse_models_without_the_parts_they_need(tiny_model):
    class EncoderDecoderOnly:  # TAEF2's adapter: encode and decode, no UNet
        device = torch.device("cpu")

        def encode(self, x, posterior_noise=None):
            return x[:, :, ::8, ::8]

        def decode(self, z):
            return z.repeat_interleave(8, 2).repeat_interleave(8, 3)

    images = torch.rand(1, 3, 16, 16)
    assert get_purification("vae").applicable(EncoderDecoderOnly())
    assert not get_purification("sdedit").applicable(EncoderDecoderOnly())
    with pytest.raises(NotApplicableError, match="UNet"):
        sdedit_purify(images, EncoderDecoderOnly())
    assert not get_purification("vae").applicable(tiny_model)  # loaded without its decoder
    with pytest.raises(NotApplicableError, match="decoder"):
        vae_roundtrip(images, tiny_model)


def test_noise_does_not_depend_on_the_batch(odd_images):
    assert torch.equal(gaussian_noise(odd_images)[1], gaussian_noise(odd_images[1:])[0])


def test_jpeg_error_grows_as_quality_drops(odd_images):
    errors = [(jpeg(odd_images, q) - odd_images).abs().mean() for q in (95, 75, 65)]
    assert errors[0] < errors[1] < errors[2]


def test_guided_filter_follows_the_guide_at_edges_and_smooths_flat_guides():
    g = torch.Generator().manual_seed(0)
    guide = (torch.rand(20, 20, 3, generator=g) * 255).numpy()
    source = (torch.rand(20, 20, 3, generator=g) * 255).numpy()
    assert abs(guided_filter(guide, guide, 2, 1e-6) - guide).max() < 1e-2  # p = I: identity
    flat = guide * 0 + 100
    out = guided_filter(flat, source, 2, 1.0)  # no edges: a box mean of the source
    assert abs(out.mean() - source.mean()) < 5 and out.std() < source.std() / 2


def test_surviving_distortion_is_one_for_identity_and_zero_for_a_constant(tiny_model):
    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    protected = (clean + 0.05).clamp(0, 1)
    torch.testing.assert_close(
        surviving_distortion(tiny_model, lambda x: x, protected, clean), torch.ones(2)
    )
    flat = surviving_distortion(tiny_model, lambda x: torch.full_like(x, 0.5), protected, clean)
    assert torch.all(flat == 0)
    # an unchanged "protected" image has no shift that could survive: NaN, not 0 (removed)
    same = surviving_distortion(tiny_model, lambda x: x, clean, clean)
    assert torch.isnan(same).all()


def test_parse_purifications():
    assert [p.name for p in parse_purifications("jpeg75, blur,jpeg75")] == ["jpeg75", "blur"]
    assert len(parse_purifications("all")) == len(PURIFICATIONS)
    with pytest.raises(ValueError, match="choose from"):
        parse_purifications("jpeg50")


def test_purify_command_writes_one_folder_per_purification(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.errors import CLIError
    from mimicshield.cli.main import app

    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    pixels = torch.randint(0, 256, (21, 30, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / "nested" / "a.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["purify", str(folder), "-o", str(out), "-m", "jpeg75,blur"])
    assert result.exit_code == 0, result.output
    for name in ("jpeg75", "blur"):
        assert Image.open(out / name / "nested" / "a.png").size == (30, 21)
    assert "2/2" in result.output  # the progress bar counts (image, purification) pairs

    refused = CliRunner().invoke(app, ["purify", str(folder), "-o", str(out), "-m", "vae"])
    assert isinstance(refused.exception, CLIError) and "needs --model" in str(refused.exception)


def test_purify_command_keeps_the_alpha_channel(tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    rgba = torch.randint(0, 256, (20, 24, 4), generator=torch.Generator().manual_seed(1))
    rgba = rgba.to(torch.uint8).numpy()
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["purify", str(tmp_path / "t.png"), "-o", str(out), "-m", "blur"]
    )
    assert result.exit_code == 0, result.output
    purified = Image.open(out / "blur" / "t.png")
    assert purified.mode == "RGBA" and purified.size == (24, 20)
    assert np.array_equal(np.asarray(purified)[..., 3], rgba[..., 3])


def test_evaluate_glue_writes_labelled_purified_folders_and_surviving_records(tmp_path, tiny_model):
    from PIL import Image

    from mimicshield.cli.purify import surviving_records, write_purified_folders
    from mimicshield.evaluation import pair_folders

    clean_dir, protected_dir = tmp_path / "clean", tmp_path / "shielded"
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        pixels = torch.randint(8, 248, (24, 24, 3), generator=g)
        noise = torch.randint(-8, 9, (24, 24, 3), generator=g)
        for folder, array in ((clean_dir, pixels), (protected_dir, pixels + noise)):
            folder.mkdir(exist_ok=True)
            Image.fromarray(array.to(torch.uint8).numpy()).save(folder / f"{name}.png")
    chosen = parse_purifications("jpeg75,blur")
    folders = write_purified_folders(clean_dir, [protected_dir], chosen, tmp_path / "out")
    _, sources = pair_folders(clean_dir, folders)
    labels = {s.name for s in sources}
    assert labels == {"clean+jpeg75", "clean+blur", "shielded+jpeg75", "shielded+blur"}
    assert all(len(s.files) == 2 for s in sources)

    records = surviving_records(clean_dir, [protected_dir], chosen, tiny_model, lambda x: x)
    assert {(r.source, r.scenario) for r in records} == {
        ("shielded", "purify-jpeg75"),
        ("shielded", "purify-blur"),
    }
    assert len(records) == 4 and all(0 < r.value < 10 for r in records)


@requires_assets
def test_evaluate_purify_adds_purified_sources_and_surviving_distortion(tiny_model_dir, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        pixels = torch.randint(8, 248, (32, 32, 3), generator=g)
        noise = torch.randint(-8, 9, (32, 32, 3), generator=g)
        for folder, array in (("clean", pixels), ("noisy", pixels + noise)):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(array.to(torch.uint8).numpy()).save(tmp_path / folder / f"{name}.png")
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "noisy"), "-o", str(out)]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--lpips-weights", str(WEIGHTS / "lpips_alexnet.safetensors"), "--resolution", "32"]
    args += ["-s", "sdedit-onestep", "--strengths", "0.02", "--purify", "jpeg75"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    sources = {r["source"] for r in document["records"]}
    assert {"noisy", "noisy+jpeg75", "clean+jpeg75"} <= sources
    surviving = [r for r in document["records"] if r["scenario"] == "purify-jpeg75"]
    assert len(surviving) == 2 and all(r["source"] == "noisy" for r in surviving)
    assert any("surviving latent distortion" in note for note in document["notes"])
    report = (out / "report.html").read_text()
    table = report.split("<h3>Surviving latent distortion after purification</h3>")[1]
    table = table.split("</table>")[0]
    mean = sum(r["value"] for r in surviving) / 2
    assert "<th>jpeg75</th>" in table and f"<td>{mean:.2f}</td>" in table

    # --overwrite replaces the evaluation whole: no folder of a variant or purification the
    # new run does not make is left beside it
    before = {path.relative_to(out) for path in out.rglob("*") if path.is_dir()}
    again = [*args[: args.index("--strengths")], "--strengths", "0.05", "--purify", "blur"]
    result = CliRunner().invoke(app, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    after = {path.relative_to(out) for path in out.rglob("*") if path.is_dir()}
    assert not [path for path in after if "jpeg75" in str(path) or "0.02" in str(path)]
    assert any("jpeg75" in str(path) for path in before) and any("0.02" in str(p) for p in before)
    assert any("blur" in str(path) for path in after) and any("0.05" in str(path) for path in after)


def test_purify_never_writes_over_an_input_another_output_or_an_earlier_file(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    folder = tmp_path / "jpeg75"
    folder.mkdir()
    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(2))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / "mine.png")
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / "mine.jpg")
    original = (folder / "mine.png").read_bytes()

    # -o the parent: jpeg75/mine.png would be the output of jpeg75 for mine.png
    named = [str(folder / "mine.png"), str(folder / "mine.jpg")]
    result = CliRunner().invoke(app, ["purify", *named, "-o", str(tmp_path), "-m", "jpeg75"])
    assert result.exit_code == 1
    assert "would overwrite an input" in result.output
    assert (folder / "mine.png").read_bytes() == original

    # mine.jpg and mine.png share an output name: one is written, the other refused
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["purify", str(folder), "-o", str(out), "-m", "blur"])
    assert result.exit_code == 1 and "same output name" in result.output
    assert "Wrote 1 image to" in result.output
    written = (out / "blur" / "mine.png").read_bytes()

    # a rerun is refused as a whole before anything is written, unless --overwrite
    again = CliRunner().invoke(
        app, ["purify", str(folder / "mine.png"), "-o", str(out), "-m", "blur"]
    )
    assert again.exit_code == 1 and "exist already" in str(again.exception)
    assert (out / "blur" / "mine.png").read_bytes() == written
    replaced = CliRunner().invoke(
        app, ["purify", str(folder / "mine.png"), "-o", str(out), "-m", "blur", "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output


def test_a_user_can_raise_the_pixel_limit_for_a_trusted_large_image(tmp_path, monkeypatch):
    import warnings

    from PIL import Image
    from typer.testing import CliRunner

    from mimicshield.cli.main import app

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused above 200 pixels
    pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(3))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / "scan.png")
    args = ["purify", str(tmp_path / "scan.png"), "-o", str(tmp_path / "out"), "-m", "blur"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        refused = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert refused.exit_code == 1 and "MIMICSHIELD_MAX_MEGAPIXELS" in refused.output
        allowed = CliRunner().invoke(app, args, env={"MIMICSHIELD_MAX_MEGAPIXELS": "0.0032"})
    assert allowed.exit_code == 0, allowed.output
    assert Image.open(tmp_path / "out" / "blur" / "scan.png").size == (40, 40)


def test_guided_filter_is_he_et_al_with_a_colour_guide_computed_window_by_window():
    """Eq. 19-21 of He et al., by hand: per window, a = (Sigma + eps U)^-1 cov(I, p) and
    b = mean(p) - a^T mean(I); each pixel averages the a, b of the windows that contain it.
    Windows at the border read the mirrored image (OpenCV's BORDER_REFLECT)."""
    import numpy as np

    g = torch.Generator().manual_seed(4)
    guide = (torch.rand(7, 6, 3, generator=g) * 255).double().numpy()
    source = (torch.rand(7, 6, 3, generator=g) * 255).double().numpy()
    radius, eps = 1, 16.0
    pad = ((radius, radius), (radius, radius), (0, 0))
    big_i, big_p = np.pad(guide, pad, mode="symmetric"), np.pad(source, pad, mode="symmetric")
    height, width = guide.shape[:2]
    a = np.zeros((height, width, 3, 3))
    b = np.zeros((height, width, 3))
    for y in range(height):
        for x in range(width):
            window_i = big_i[y : y + 2 * radius + 1, x : x + 2 * radius + 1].reshape(-1, 3)
            window_p = big_p[y : y + 2 * radius + 1, x : x + 2 * radius + 1].reshape(-1, 3)
            mu, mean_p = window_i.mean(0), window_p.mean(0)
            sigma = window_i.T @ window_i / len(window_i) - np.outer(mu, mu)
            cov = window_i.T @ window_p / len(window_p) - np.outer(mu, mean_p)
            a[y, x] = np.linalg.solve(sigma + eps * np.eye(3), cov)
            b[y, x] = mean_p - a[y, x].T @ mu
    big_a = np.pad(a, pad + ((0, 0),), mode="symmetric")
    big_b = np.pad(b, pad, mode="symmetric")
    want = np.zeros_like(source)
    for y in range(height):
        for x in range(width):
            mean_a = big_a[y : y + 2 * radius + 1, x : x + 2 * radius + 1].mean((0, 1))
            mean_b = big_b[y : y + 2 * radius + 1, x : x + 2 * radius + 1].mean((0, 1))
            want[y, x] = mean_a.T @ guide[y, x] + mean_b
    np.testing.assert_allclose(
        guided_filter(guide, source, radius, eps), want, rtol=1e-6, atol=1e-6
    )


def test_the_help_lists_every_purification():
    from mimicshield.cli.purify import PURIFICATION_NAMES
    from mimicshield.purify import PURIFICATIONS

    assert PURIFICATION_NAMES.split(", ") == list(PURIFICATIONS)
