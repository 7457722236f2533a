"""Bad options, weights and model files: one line naming the problem, before the model loads.

A ``CLIError`` is what ``main()`` prints as one line without the debugging hint, so these
tests check for that type, and for the option or file the message must name.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.errors import CLIError
from mimicshield.cli.main import app


@pytest.fixture
def model_never_loads(monkeypatch):
    """Every check below must fire before a model loads: loading one fails the test."""

    def load_models(*args, **kwargs):
        pytest.fail("the model was loaded before the bad option was found")

    monkeypatch.setattr("mimicshield.models.load_models", load_models)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(noise(16, 16, seed=i)).save(folder / f"img{i}.png")
    return folder


def refused(args: list[str], *needles: str) -> str:
    """Run the CLI; it must stop with a one-line CLIError naming every needle."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert isinstance(result.exception, CLIError), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- 13. options checked at the top of each command ------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--robust", "foo"], "--robust"),
        (["--method", "nope"], "--method"),
        (["--device", "gpu"], "--device"),
        (["--dtype", "fp9"], "--dtype"),
        (["--sdst-r", "-5"], "--sdst-r"),
    ],
)
def test_protect_options(model_never_loads, image_folder, tmp_path, options, needle):
    refused(["protect", str(image_folder), "-o", str(tmp_path / "out"), *options], needle)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--inpaint-keep", "2"], "--inpaint-keep"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--ti-lr", "-1"], "--ti-lr"),
        (["--lora-lr", "0"], "--lora-lr"),
        (["--ti-steps", "0"], "--ti-steps"),
        (["--lora-steps", "0"], "--lora-steps"),
        (["--guidance", "-5"], "--guidance"),
        (["--device", "gpu"], "--device"),
        (["--dtype", "fp9"], "--dtype"),
        (["--family", "sd9"], "--family"),
    ],
)
def test_mimic_and_evaluate_options(model_never_loads, image_folder, tmp_path, options, needle):
    refused(["mimic", str(image_folder), "-o", str(tmp_path / "out"), *options], needle)
    clean = str(image_folder)
    refused(["evaluate", clean, clean, "-o", str(tmp_path / "ev"), *options], needle)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--device", "gpu"], "--device"),
        (["--dtype", "fp9"], "--dtype"),
        (["--family", "x"], "--family"),
    ],
)
def test_purify_model_options(model_never_loads, image_folder, tmp_path, options, needle):
    args = ["purify", str(image_folder), "-o", str(tmp_path / "out"), "-m", "vae"]
    refused([*args, "--model", str(tmp_path / "model"), *options], needle)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--res", "0"], "--res"),
        (["--steps", "0"], "--steps"),
        (["--batch", "0"], "--batch"),
        (["--threads", "0"], "--threads"),
        (["--methods", "nope"], "--methods"),
        (["--dtype", "fp9"], "--dtype"),
        (["--device", "gpu"], "--device"),
    ],
)
def test_bench_options(monkeypatch, options, needle):
    monkeypatch.setattr("mimicshield.bench.run_bench", lambda *a, **k: pytest.fail("timed"))
    refused(["bench", "--tiny", *options], needle)


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_max_megapixels_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv("MIMICSHIELD_MAX_MEGAPIXELS", value)
    refused(["methods"], "MIMICSHIELD_MAX_MEGAPIXELS", "positive")


# --- 14. bench --json-out ---------------------------------------------------------------------


def test_bench_json_out_keeps_a_file_of_the_users(tmp_path, monkeypatch):
    monkeypatch.setattr("mimicshield.bench.run_bench", lambda *a, **k: pytest.fail("timed"))
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    refused(["bench", "--tiny", "--json-out", str(mine)], str(mine), "earlier bench results")
    assert mine.read_text() == '{"my": "notes"}'


def test_bench_json_out_that_cannot_be_written_fails_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr("mimicshield.bench.run_bench", lambda *a, **k: pytest.fail("timed"))
    (tmp_path / "file").write_text("")
    refused(["bench", "--tiny", "--json-out", str(tmp_path / "file" / "b.json")], "cannot write")


def test_bench_json_out_replaces_earlier_bench_results(tmp_path):
    from mimicshield.cli.bench import json_out_problem

    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"settings": {}, "environment": {}, "results": []}))
    assert json_out_problem(earlier) is None
    assert json_out_problem(tmp_path / "new" / "bench.json") is None  # made when it is written


# --- 12. masks --------------------------------------------------------------------------------


def test_a_mask_file_that_is_no_image_is_named(model_never_loads, image_folder, tmp_path):
    text = tmp_path / "text.png"
    text.write_text("hello world\n")
    args = ["mimic", str(image_folder), "-o", str(tmp_path / "out"), "-s", "inpaint"]
    message = refused([*args, "--mask", str(text)], "--mask", str(text), "not an image")
    assert "cannot identify" not in message  # not Pillow's own words


def test_inpaint_with_no_mask_for_any_image_stops_before_loading(
    model_never_loads, image_folder, tmp_path
):
    masks = tmp_path / "masks"
    masks.mkdir()
    args = ["mimic", str(image_folder), "-o", str(tmp_path / "out"), "-s", "inpaint"]
    refused([*args, "--mask", str(masks)], "no mask for it", "img0")


def test_evaluate_names_a_missing_mask_before_loading(model_never_loads, image_folder, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (16, 16), 255).save(masks / "img0.png")
    protected = tmp_path / "protected"
    shutil.copytree(image_folder, protected)
    args = ["evaluate", str(image_folder), str(protected), "-o", str(tmp_path / "ev")]
    refused([*args, "-s", "inpaint", "--mask", str(masks)], "1 clean image(s)", "img1")


# --- 6. LPIPS weights -------------------------------------------------------------------------


def _lpips_file(path):
    from safetensors.torch import save_file

    from mimicshield.metrics import LPIPS

    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(path))
    return path


def test_lpips_weights_are_checked_from_the_header(tmp_path):
    from safetensors.torch import save_file

    from mimicshield.evaluation import check_lpips_weights

    check_lpips_weights(_lpips_file(tmp_path / "good.safetensors"))  # no error
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk\n")
    with pytest.raises(ValueError, match="not a safetensors file"):
        check_lpips_weights(junk)
    other = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="not LPIPS-AlexNet weights"):
        check_lpips_weights(other)
    with pytest.raises(ValueError, match="a folder"):
        check_lpips_weights(tmp_path)


@pytest.mark.parametrize("kind", ["junk", "folder"])
def test_evaluate_names_bad_lpips_weights_before_the_model_loads(
    model_never_loads, image_folder, tiny_model_dir, tmp_path, kind
):
    weights = tmp_path / "weights"
    if kind == "junk":
        weights.write_bytes(b"junk\n")
    else:
        weights.mkdir()
    protected = tmp_path / "protected"
    shutil.copytree(image_folder, protected)
    args = ["evaluate", str(image_folder), str(protected), "-o", str(tmp_path / "ev")]
    args += ["--model", str(tiny_model_dir), "--lpips-weights", str(weights)]
    message = refused(args, "--lpips-weights", str(weights))
    assert "not found" not in message


# --- 7. TAEF2 weights -------------------------------------------------------------------------


def test_corrupt_or_foreign_taef2_weights_are_one_line(tmp_path, image_folder):
    from mimicshield.taesd import TaefWeightsError, TinyAutoencoder, load_taef2

    folder = tmp_path / "taef"
    folder.mkdir()
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        (folder / name).write_bytes(b"junk\n")
    with pytest.raises(TaefWeightsError, match="taef2_encoder.pth: not a TAEF2 weights file"):
        load_taef2(folder)
    decoder = TinyAutoencoder().decoder.state_dict()  # the decoder's weights as the encoder's
    torch.save(decoder, folder / "taef2_encoder.pth")
    with pytest.raises(TaefWeightsError, match="not the TAEF2 encoder weights") as error:
        load_taef2(folder)
    assert "\n" not in str(error.value)
    args = ["purify", str(image_folder), "-o", str(tmp_path / "out"), "-m", "vae"]
    refused([*args, "--model", str(folder)], "--model", "taef2_encoder.pth")
    assert not (tmp_path / "out").exists()


# --- 5. a tokenizer without files ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty folder", "no model_max_length"])
def test_a_broken_tokenizer_is_refused_at_load(tiny_model_dir, tmp_path, damage):
    from mimicshield.models import ModelLoadError, load_models
    from mimicshield.testing import copy_tiny_model

    model = copy_tiny_model(tiny_model_dir, tmp_path / "model")
    config = model / "tokenizer" / "tokenizer_config.json"
    if damage == "empty folder":
        for file in (model / "tokenizer").iterdir():
            file.unlink()
    else:
        values = json.loads(config.read_text())
        del values["model_max_length"]
        config.write_text(json.dumps(values))
    with pytest.raises(ModelLoadError, match="its tokenizer has no") as error:
        load_models(str(model), device="cpu", dtype="fp32")
    assert "\n" not in str(error.value)
