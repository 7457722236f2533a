"""``mimic`` on awkward inputs: its own outputs, masks missing for some images, Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in (1, 2):
        Image.fromarray(noise(32, 32, seed=i)).save(folder / f"img{i}.png")
    return folder


def mimic(model, *args: str):
    options = ["--model", str(model), "--device", "cpu", "--dtype", "fp32", "--resolution", "32"]
    options += ["--strengths", "0.1", "--sample-steps", "1"]
    return CliRunner().invoke(app, ["mimic", *args, *options], env={"COLUMNS": "200"})


def test_outputs_inside_the_input_folder_are_not_read_back(tiny_model_dir, photos):
    """The auditor's mi/: mimic mi -o mi/m2, then mimic mi -o mi/m3 (and again into m2)."""
    first = mimic(tiny_model_dir, str(photos), "-o", str(photos / "m2"), "-s", "sdedit-onestep")
    assert first.exit_code == 0, first.output
    for out, extra in ((photos / "m3", []), (photos / "m2", ["--overwrite"])):
        again = mimic(tiny_model_dir, str(photos), "-o", str(out), "-s", "sdedit-onestep", *extra)
        assert again.exit_code == 0, again.output
        record = json.loads((out / "mimic.json").read_text())
        assert sorted(record["inputs"]) == [str(photos / "img1.png"), str(photos / "img2.png")]
        assert sorted(p.name for p in (out / "sdedit-onestep@0.1").iterdir()) == [
            "img1.png",
            "img2.png",
        ]


def test_a_missing_mask_skips_inpaint_for_that_image_and_the_batch_goes_on(
    tiny_model_dir, photos, tmp_path
):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "img1.png")
    out = tmp_path / "out"
    result = mimic(
        tiny_model_dir, str(photos), "-o", str(out), "-s", "sdedit-onestep,inpaint",
        "--mask", str(masks),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert (out / "inpaint" / "img1.png").is_file() and not (out / "inpaint" / "img2.png").exists()
    assert (out / "sdedit-onestep@0.1" / "img2.png").is_file()  # the other scenarios ran for it
    record = json.loads((out / "mimic.json").read_text())
    (failure,) = record["failed"]
    assert "img2.png: no mask for it" in failure and "inpaint skipped" in failure


def test_mimic_interrupted_says_so_and_leaves_only_whole_files(
    tiny_model_dir, photos, tmp_path, interrupt_second_save
):
    out = tmp_path / "out"
    result = mimic(tiny_model_dir, str(photos), "-o", str(out), "-s", "sdedit-onestep")
    assert result.exit_code == 130
    assert "Interrupted" in result.output and "1 file(s)" in result.output
    assert [p.name for p in (out / "sdedit-onestep@0.1").iterdir()] == ["img1.png"]
    assert not (out / "mimic.json").exists()


def test_overwrite_keeps_a_read_only_output_and_does_the_rest(tiny_model_dir, photos, tmp_path):
    import os

    out = tmp_path / "out"
    args = [str(photos), "-o", str(out), "-s", "sdedit-onestep"]
    assert mimic(tiny_model_dir, *args).exit_code == 0
    kept = out / "sdedit-onestep@0.1" / "img1.png"
    os.chmod(kept, 0o444)
    before = kept.read_bytes()
    (out / "sdedit-onestep@0.1" / "img2.png").write_bytes(b"stale")
    result = mimic(tiny_model_dir, *args, "--overwrite")
    assert result.exit_code == 1, result.output
    assert f"{kept} is read-only; not replaced." in result.output
    assert kept.read_bytes() == before
    Image.open(out / "sdedit-onestep@0.1" / "img2.png").load()  # the rest is done
    record = json.loads((out / "mimic.json").read_text())
    assert record["failed"] == [f"{kept} is read-only; not replaced."]
    assert str(kept) not in record["outputs"]

    # the run's record itself: refused before the model loads
    os.chmod(out / "mimic.json", 0o444)
    refused = mimic(tmp_path / "no-such-model", *args, "--overwrite")
    assert refused.exit_code == 1 and "mimic.json is read-only" in str(refused.exception)


def test_overwrite_refuses_a_training_whose_sample_is_read_only(photos, tmp_path):
    """A textual inversion's or LoRA's weights and samples are one set: a read-only sample
    kept beside new ones would mix two runs, so the run is refused before the model loads."""
    import os

    out = tmp_path / "out"
    sample = out / "lora" / "sample_001.png"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"an earlier run's sample")
    os.chmod(sample, 0o444)
    args = [str(photos), "-o", str(out), "-s", "lora", "--overwrite"]
    refused = mimic(tmp_path / "no-such-model", *args)
    assert refused.exit_code == 1
    assert f"{sample} is read-only; not replaced" in str(refused.exception)
    assert sample.read_bytes() == b"an earlier run's sample"


def test_an_image_too_small_for_resolution_0_is_left_out_and_named(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The reviewer's tiny7x5.png beside odd67x45.png: the small one is one line naming it,
    said before the model loads; the other is mimicked at its own size, and the run exits 1."""
    Image.fromarray(noise(5, 7, seed=1)).save(tmp_path / "tiny7x5.png")
    Image.fromarray(noise(45, 67, seed=2)).save(tmp_path / "odd67x45.png")
    out = tmp_path / "out"
    args = ["mimic", str(tmp_path / "tiny7x5.png"), str(tmp_path / "odd67x45.png"), "-o", str(out)]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--resolution", "0", "-s", "sdedit-onestep", "--strengths", "0.1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    with Image.open(out / "sdedit-onestep@0.1" / "odd67x45.png") as written:
        assert written.size == (64, 40)
    record = json.loads((out / "mimic.json").read_text())
    (message,) = record["failed"]
    assert "tiny7x5.png" in message and "7x5" in message and "8 pixels" in message
    assert "\n" not in message and record["inputs"] == [str(tmp_path / "odd67x45.png")]
    assert "1 input(s) left out" in result.output

    monkeypatch.setattr(
        "mimicshield.models.load_models", lambda *a, **k: pytest.fail("the model loaded")
    )
    alone = CliRunner().invoke(app, [*args[:2], *args[3:], "--overwrite"])
    assert "tiny7x5.png: 7x5 is smaller than 8 pixels" in str(alone.exception)


def _mimic_at(model, photos, out, strength: str, *extra: str):
    args = ["mimic", str(photos), "-o", str(out), "--model", str(model), "--device", "cpu"]
    args += ["--dtype", "fp32", "--resolution", "32", "-s", "sdedit-onestep"]
    args += ["--strengths", strength, *extra]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_overwrite_removes_the_earlier_runs_variants_and_nothing_else(
    tiny_model_dir, photos, tmp_path
):
    out = tmp_path / "out"
    first = _mimic_at(tiny_model_dir, photos, out, "0.1")
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "a.png").write_bytes(b"mine")
    again = _mimic_at(tiny_model_dir, photos, out, "0.2", "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "sdedit-onestep@0.1").exists()
    assert sorted(p.name for p in (out / "sdedit-onestep@0.2").iterdir()) == [
        "img1.png",
        "img2.png",
    ]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "a.png").is_file()

    (out / "sdedit-onestep@0.2" / "keep.txt").write_text("mine")  # a user's file in mimic's folder
    third = _mimic_at(tiny_model_dir, photos, out, "0.3", "--overwrite")
    assert third.exit_code == 0, third.output
    assert [p.name for p in (out / "sdedit-onestep@0.2").iterdir()] == ["keep.txt"]
    record = json.loads((out / "mimic.json").read_text())
    assert all("@0.3" in path for path in record["outputs"])


def test_overwrite_from_inside_the_output_folder_still_removes_the_earlier_outputs(
    tiny_model_dir, photos, tmp_path, monkeypatch
):
    """mimic.json lists outputs from the earlier working folder: read from inside -o, they
    resolve to the wrong place inside it, and must still be found."""
    monkeypatch.chdir(tmp_path)
    first = _mimic_at(tiny_model_dir, photos, Path("o1"), "0.1,0.2")
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(tmp_path / "o1")
    again = _mimic_at(tiny_model_dir, photos, Path("."), "0.1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "o1" / "sdedit-onestep@0.2").exists()
    assert (tmp_path / "o1" / "sdedit-onestep@0.1" / "img1.png").is_file()


def test_overwrite_refuses_to_remove_a_read_only_earlier_output(
    tiny_model_dir, photos, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert _mimic_at(tiny_model_dir, photos, out, "0.1").exit_code == 0
    kept = out / "sdedit-onestep@0.1" / "img1.png"
    kept.chmod(0o444)
    monkeypatch.setattr(
        "mimicshield.models.load_models", lambda *a, **k: pytest.fail("the model loaded")
    )
    result = _mimic_at(tiny_model_dir, photos, out, "0.2", "--overwrite")
    assert f"{kept}, an earlier run's output" in str(result.exception)
    assert "read-only" in str(result.exception)
    assert kept.is_file() and (out / "sdedit-onestep@0.1" / "img2.png").is_file()


def test_inpainting_options_without_the_inpaint_scenario_are_said_to_be_ignored(
    tiny_model_dir, photos, tmp_path, monkeypatch
):
    """--mask and --inpaint-model do nothing without the inpaint scenario: said, and the
    inpainting model is not loaded."""
    from mimicshield import models

    loaded = []
    load_models = models.load_models
    monkeypatch.setattr(
        models, "load_models", lambda s, **k: loaded.append(s) or load_models(s, **k)
    )
    mask = tmp_path / "mask.png"
    Image.fromarray(noise(32, 32, seed=9)).save(mask)
    args = [str(photos), "-o", str(tmp_path / "out"), "-s", "sdedit-onestep", "--mask", str(mask)]
    args += ["--inpaint-model", str(tmp_path / "never-loaded")]
    with pytest.warns(UserWarning) as said:
        result = mimic(tiny_model_dir, *args)
    assert result.exit_code == 0, result.output
    messages = [str(w.message) for w in said]
    for option in ("--mask", "--inpaint-model"):
        assert (
            f"{option} is for the inpaint scenario, which --scenarios leaves out: ignored."
            in messages
        )
    assert loaded == [str(tiny_model_dir)]
