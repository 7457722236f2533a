"""``evaluate`` given folders that do not pair up: refused first, or counted and reported."""

from __future__ import annotations

import json
import warnings

import pytest
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.errors import CLIError
from mimicshield.cli.main import app
from mimicshield.evaluation import pair_folders

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(noise(32, 32, seed=seed + i)).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def model_never_loads(monkeypatch):
    monkeypatch.setattr(
        "mimicshield.models.load_models", lambda *a, **k: pytest.fail("the model loaded")
    )


def evaluate(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args], env={"COLUMNS": "200"})


# --- 9. the clean folder as a protected one, a folder given twice ---------------------------


def test_the_clean_folder_given_as_protected_is_refused(model_never_loads, tmp_path):
    clean = _images(tmp_path / "clean", ["a", "b"])
    for given in (str(clean), f"{clean}/", f"{clean}/../clean"):
        result = evaluate(str(clean), given, "-o", str(tmp_path / "ev"))
        assert isinstance(result.exception, CLIError)
        assert "is the clean folder itself" in str(result.exception)


def test_a_protected_folder_given_twice_is_refused(model_never_loads, tmp_path):
    clean = _images(tmp_path / "clean", ["a"])
    protected = _images(tmp_path / "prot", ["a"], seed=5)
    result = evaluate(str(clean), str(protected), f"{protected}/", "-o", str(tmp_path / "ev"))
    assert isinstance(result.exception, CLIError) and "given twice" in str(result.exception)


def test_a_protected_folder_matching_nothing_is_refused_before_loading(model_never_loads, tmp_path):
    clean = _images(tmp_path / "clean", ["a"])
    other = _images(tmp_path / "other", ["z"])
    result = evaluate(str(clean), str(other), "-o", str(tmp_path / "ev"))
    assert isinstance(result.exception, CLIError)
    assert "none of its images match" in str(result.exception)


# --- 3. nothing under -o or the protected folders counts as clean -----------------------------


def test_pairing_leaves_out_the_output_and_protected_folders_inside_the_clean_one(tmp_path):
    clean = _images(tmp_path / "photos", ["a", "b"])
    protected = _images(clean / "protected", ["a", "b"], seed=3)  # no manifest: still left out
    _images(clean / "eval" / "purified" / "clean+blur", ["a", "b"], seed=6)
    found, (method,) = pair_folders(clean, [protected], exclude=[clean / "eval"])
    assert sorted(found.files) == ["a", "b"]
    assert sorted(method.files) == ["a", "b"] and not method.missing


# --- 10 and 3: a run with a missing copy, an extra file, and -o inside the clean folder -------


def test_missing_copies_exit_1_extra_files_are_warned_and_o_inside_clean_is_not_read(
    tiny_model_dir, tmp_path
):
    from safetensors.torch import save_file

    from mimicshield.metrics import LPIPS

    lpips = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips))
    clean = _images(tmp_path / "clean", ["img1", "img2", "img3"])
    protected = _images(tmp_path / "prot", ["img1", "img2", "extra"], seed=10)
    out = clean / "eval"  # inside the clean folder, with purified copies written into it
    args = [str(clean), str(protected), "-o", str(out), "--model", str(tiny_model_dir)]
    args += ["--device", "cpu", "--dtype", "fp32", "--lpips-weights", str(lpips)]
    args += ["--resolution", "32", "--thumbnail-size", "32", "-s", "sdedit-onestep"]
    args += ["--strengths", "0.1", "--purify", "blur"]
    result = evaluate(*args)
    assert result.exit_code == 1, result.output
    document = json.loads((out / "metrics.json").read_text())
    sources = {source["name"]: source for source in document["sources"]}
    # img3 has no protected copy, so every source leaves it out (each row averages img1, img2)
    assert sources["clean"]["images"] == 2  # not the purified copies under -o either
    assert sources["clean+blur"]["images"] == 2
    assert all("img3" in entry for entry in document["left_out"])
    # the missing copy and the clean image; not the purified copies (evaluate's own files)
    assert len(document["left_out"]) == 2
    assert any(
        "no clean image of the same name" in w and "extra" in w for w in document["warnings"]
    )
    assert "2 image(s) left out" in result.output


@pytest.mark.parametrize("inside", ["purified", "mimicry/sds"])
def test_an_input_inside_the_folders_evaluate_writes_is_refused(tmp_path, inside):
    """`evaluate clean ev/purified -o ev --overwrite` would have deleted the protected folder
    it was given, once the model had loaded."""
    clean, protected = tmp_path / "clean", tmp_path / "ev" / inside
    for folder in (clean, protected):
        folder.mkdir(parents=True)
        Image.new("RGB", (16, 16), (10, 20, 30)).save(folder / "a.png")
    args = ["evaluate", str(clean), str(protected), "-o", str(tmp_path / "ev"), "--overwrite"]
    result = CliRunner().invoke(app, [*args, "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 1
    assert "which evaluate writes" in f"{result.output} {result.exception}"
    assert (protected / "a.png").is_file()


def test_overwrite_refuses_an_evaluation_holding_a_read_only_file(model_never_loads, tmp_path):
    import os

    clean = _images(tmp_path / "clean", ["a"])
    protected = _images(tmp_path / "prot", ["a"], seed=5)
    out = tmp_path / "ev"
    (out / "mimicry" / "clean").mkdir(parents=True)
    kept = out / "mimicry" / "clean" / "a.png"
    kept.write_bytes(b"kept")
    (out / "report.html").write_text("earlier")
    os.chmod(kept, 0o444)
    result = evaluate(str(clean), str(protected), "-o", str(out), "--overwrite")
    assert isinstance(result.exception, CLIError)
    assert f"{kept} is read-only; not replaced" in str(result.exception)
    assert kept.read_bytes() == b"kept" and (out / "report.html").read_text() == "earlier"


def test_an_image_too_small_for_resolution_0_is_left_out_and_the_rest_evaluated(
    tiny_model_dir, tmp_path, monkeypatch
):
    from safetensors.torch import save_file

    from mimicshield.metrics import LPIPS

    lpips = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips))
    clean, protected = tmp_path / "clean", tmp_path / "prot"
    for folder, seed in ((clean, 0), (protected, 10)):
        folder.mkdir()
        Image.fromarray(noise(5, 7, seed=seed)).save(folder / "tiny7x5.png")
        Image.fromarray(noise(45, 67, seed=seed + 1)).save(folder / "odd67x45.png")
    out = tmp_path / "ev"
    args = [str(clean), str(protected), "-o", str(out), "--model", str(tiny_model_dir)]
    args += ["--device", "cpu", "--dtype", "fp32", "--lpips-weights", str(lpips)]
    args += ["--resolution", "0", "--thumbnail-size", "32", "-s", "sdedit-onestep"]
    args += ["--strengths", "0.1"]
    from mimicshield import models

    load_models, said_at_load = models.load_models, []

    def load_after_the_warning(*a, **k):
        said_at_load.extend(str(w.message) for w in caught)
        return load_models(*a, **k)

    monkeypatch.setattr(models, "load_models", load_after_the_warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(*args)
    assert result.exit_code == 1, result.output
    early = "1 clean image(s) will be left out (first: "
    assert any(m.startswith(early) and "tiny7x5.png: 7x5" in m for m in said_at_load)
    document = json.loads((out / "metrics.json").read_text())
    assert {source["images"] for source in document["sources"]} == {1}
    assert document["left_out"] == [str(clean / "tiny7x5.png")]
    (warning,) = [w for w in document["warnings"] if "tiny7x5.png" in w]
    assert "7x5 is smaller than 8 pixels" in warning and "\n" not in warning
    assert "1 image(s) left out" in result.output

    (clean / "odd67x45.png").unlink()  # only too-small images: refused before the model loads
    monkeypatch.setattr(
        "mimicshield.models.load_models", lambda *a, **k: pytest.fail("the model loaded")
    )
    alone = evaluate(*args, "--overwrite")
    assert isinstance(alone.exception, CLIError)
    assert "tiny7x5.png: 7x5 is smaller than 8 pixels" in str(alone.exception)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--clip", "./no-clip-here", "no such folder"),
        ("--clip", "empty-folder", "no config.json"),
        ("--clip", "weights.bin", "a file"),
        ("--fid-weights", "missing.pt", "no such file"),
        ("--fid-weights", "weights.bin", "not a TorchScript file"),
    ],
)
def test_a_clip_or_fid_model_that_cannot_load_is_refused_before_the_model(
    model_never_loads, tmp_path, monkeypatch, option, value, said
):
    from safetensors.torch import save_file

    from mimicshield.metrics import LPIPS

    lpips = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips))
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"not a zip archive")
    monkeypatch.chdir(tmp_path)
    clean = _images(tmp_path / "clean", ["a"])
    protected = _images(tmp_path / "prot", ["a"], seed=5)
    args = [str(clean), str(protected), "-o", str(tmp_path / "ev"), "--lpips-weights", str(lpips)]
    result = evaluate(*args, option, value)
    assert isinstance(result.exception, CLIError)
    message = str(result.exception)
    assert message.startswith(f"{option} {value}: ") and said in message
    assert not (tmp_path / "ev").exists()
