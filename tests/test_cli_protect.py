"""``mimicshield protect`` end to end: options, failures and exit codes, warnings, provenance."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from image_cases import CREATOR_XMP, bad_files, noise, png16, private_exif, private_jpeg, srgb
from PIL import Image
from rich.markup import escape
from typer.testing import CliRunner

from mimicshield.cli.main import CLIError, app
from mimicshield.metadata import DMI_PROHIBITED_AIML

# tiny inputs would be upscaled to the default work size 512: protect them natively instead
FAST = ["--method", "encoder", "--steps", "1", "--step-size", "4", "--eps", "8"]
FAST += ["--work-size", "native"]
CPU = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(24, 32, seed=1)).save(folder / "art.png")
    Image.fromarray(noise(29, 37, seed=2)).save(folder / "photo.jpg")
    return folder


@pytest.fixture
def preloaded(monkeypatch, tiny_model):
    """Skip reloading the tiny model in every CLI call (loading has its own tests).

    Each call gets its own copy of the holder: ``protect`` releases the text encoder from the
    model it is given, and the session's shared model must keep it.
    """
    monkeypatch.setattr(
        "mimicshield.models.load_models",
        lambda *args, **kwargs: dataclasses.replace(tiny_model, _prompt_cache={}),
    )


def invoke(*args: str):
    # wide enough that rich does not wrap a failure line in the middle
    return CliRunner(env={"COLUMNS": "300"}).invoke(app, ["protect", *FAST, *CPU, *args])


def test_a_bad_file_fails_alone_exits_non_zero_and_rerun_resumes(tmp_path, folder, tiny_model_dir):
    shutil.copy(bad_files(tmp_path / "bad")["corrupt"], folder / "broken.png")
    out = tmp_path / "out"
    args = [str(folder), "-o", str(out), "--model", str(tiny_model_dir)]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "broken.png: not an image" in result.output  # the failure list of the end table
    written = sorted(p.name for p in out.iterdir() if p.name != ".mimicshield.lock")
    assert written == ["art.png", "manifest.json", "photo.png"]
    # the lock file stays, unlocked; filelock removes it on release on Windows
    assert (out / ".mimicshield.lock").is_file() or sys.platform == "win32"
    assert Image.open(out / "photo.png").size == (37, 29)

    again = invoke(*args)
    assert again.exit_code == 1
    entries = json.loads((out / "manifest.json").read_text())["images"]
    statuses = {entry["relative"]: entry["status"] for entry in entries}
    assert statuses == {"art.png": "skipped", "photo.jpg": "skipped", "broken.png": "failed"}


def test_a_refused_resume_names_the_settings_that_changed(tmp_path, folder, preloaded):
    out = tmp_path / "out"
    assert invoke(str(folder / "art.png"), "-o", str(out)).exit_code == 0
    again = invoke(str(folder / "art.png"), "-o", str(out), "--seed", "5")
    assert again.exit_code == 1
    said = " ".join(again.output.split())
    assert "different settings (seed 0 -> 5)" in said, said


def test_a_model_folder_named_another_way_still_resumes(tmp_path, folder, preloaded, monkeypatch):
    """`--model tiny` and `--model ./tiny/` are one model: the rerun skips, not refuses."""
    model = tmp_path / "tiny"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert invoke(str(folder / "art.png"), "-o", str(out), "--model", "tiny").exit_code == 0
    again = invoke(str(folder / "art.png"), "-o", str(out), "--model", f"{model}/")
    assert again.exit_code == 0, again.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["status"] for entry in manifest["images"]] == ["skipped"]
    assert manifest["model"] == str(model)


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
def test_outputs_carry_the_provenance_xmp_unless_no_metadata(tmp_path, folder, preloaded):
    def data_mining(path) -> str | None:
        command = ["exiftool", "-j", "-n", "-XMP-plus:DataMining", str(path)]
        tags = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)[0]
        return tags.get("DataMining")

    assert invoke(str(folder / "art.png"), "-o", str(tmp_path / "a")).exit_code == 0
    assert data_mining(tmp_path / "a" / "art.png") == DMI_PROHIBITED_AIML
    bare = invoke(str(folder / "art.png"), "-o", str(tmp_path / "b"), "--no-metadata")
    assert bare.exit_code == 0 and data_mining(tmp_path / "b" / "art.png") is None


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
def test_strip_metadata_removes_exif_gps_xmp_and_text_but_keeps_the_icc(tmp_path, preloaded):
    folder = tmp_path / "in"
    folder.mkdir()
    private_jpeg(folder / "photo.jpg")
    png16(folder / "deep.png", icc=srgb(), exif=private_exif(), xmp=CREATOR_XMP,
          text={"Comment": "shot at home"})  # fmt: skip

    def tags(path) -> dict:
        command = ["exiftool", "-j", "-G1", "-a", str(path)]
        return json.loads(subprocess.run(command, capture_output=True, check=True).stdout)[0]

    def private(path) -> set[str]:
        """The EXIF groups and the XMP / text tags of ``path`` that tell about the author."""
        found = tags(path)
        groups = {key.split(":")[0] for key in found} & {"GPS", "IFD0", "ExifIFD"}
        return groups | ({"XMP-dc:Creator", "PNG:Comment"} & set(found))

    assert invoke(str(folder), "-o", str(tmp_path / "kept")).exit_code == 0
    for name in ("photo.png", "deep.png"):
        assert {"GPS", "IFD0", "XMP-dc:Creator"} <= private(tmp_path / "kept" / name)

    result = invoke(str(folder), "-o", str(tmp_path / "out"), "--strip-metadata")
    assert result.exit_code == 0, result.output
    for name, source in (("photo.png", "photo.jpg"), ("deep.png", "deep.png")):
        output = tmp_path / "out" / name
        assert private(output) == set(), name
        found = tags(output)
        assert found["XMP-plus:DataMining"] == DMI_PROHIBITED_AIML  # our notice stays
        with Image.open(output) as saved, Image.open(folder / source) as original:
            assert saved.info["icc_profile"] == original.info["icc_profile"]
            assert saved.size == original.size
        assert found["PNG:BitDepth"] == (16 if name == "deep.png" else 8)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["strip_metadata"] is True


def test_jpeg_output_warns_once_that_it_weakens_protection(tmp_path, folder, preloaded):
    result = invoke(str(folder), "-o", str(tmp_path / "out"), "--format", "jpeg", "--quality", "90")
    assert result.exit_code == 0, result.output
    assert result.output.count("JPEG is lossy") == 1
    assert sorted(p.suffix for p in (tmp_path / "out").glob("*.jp*")) == [".jpg", ".jpg"]


def test_batch_size_auto_and_numbers_give_the_same_files(tmp_path, folder, preloaded):
    """On the CPU ``auto`` means one image at a time; each image draws its own randomness, so
    any batch size protects it the same."""
    outputs = {}
    for size in ("auto", "2"):
        out = tmp_path / size
        result = invoke(str(folder), "-o", str(out), "--batch-size", size, "--work-size", "16")
        assert result.exit_code == 0, result.output
        outputs[size] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    assert outputs["auto"].keys() == outputs["2"].keys() and outputs["auto"]
    for name, pixels in outputs["auto"].items():
        np.testing.assert_array_equal(pixels, outputs["2"][name])


def test_work_size_option_reaches_the_manifest(tmp_path, folder, preloaded):
    result = invoke(str(folder / "photo.jpg"), "-o", str(tmp_path / "out"), "--work-size", "16")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["work_size"] == 16
    assert Image.open(tmp_path / "out" / "photo.png").size == (37, 29)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quality", "80"], "--quality only applies to --format jpeg"),
        (["--format", "jpeg", "--quality", "0"], "between 1 and 100"),
        (["--work-size", "huge"], "native"),
        (["--tile-size", "8"], "--tile-size"),
        (["--batch-size", "0"], "at least 1"),
        (["--batch-size", "many"], "a number or 'auto'"),
        (["--cuda-graphs", "--compile"], "does not combine"),
        (["--cuda-graphs", "--low-memory"], "does not combine"),
        (["--eps", "-4"], "--eps must be between 1 and 255, in 1/255 units; got -4."),
        (["--eps", "0"], "--eps must be between 1 and 255, in 1/255 units; got 0."),
        (["--eps", "256"], "--eps must be between 1 and 255, in 1/255 units; got 256."),
        (
            ["--eps", "0.5"],
            "--eps must be between 1 and 255, in 1/255 units; got 0.5, which looks like the "
            "[0, 1] scale (did you mean 128?).",
        ),
        (["--eps", "0.001"], "between 1 and 255, in 1/255 units; got 0.001, which looks like"),
        (["--step-size", "1e9"], "--step-size must be in (0, 255], in 1/255 units; got 1e+09"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--seed", str(10**20)], "--seed must be between 0 and"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, folder, options, message):
    result = invoke(str(folder), "-o", str(tmp_path / "out"), *options)
    assert isinstance(result.exception, CLIError) and message in str(result.exception)


def test_ctrl_c_says_how_to_resume(tmp_path, folder, preloaded, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mimicshield.runner.protect_files", interrupted)
    result = invoke(str(folder), "-o", str(tmp_path / "out"))
    assert result.exit_code == 130 and "run the same command again" in result.output


def test_progress_reports_how_long_the_first_step_took_once():
    """With --compile the first step compiles: its time is printed once, then never again."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from mimicshield.cli.progress import ProtectProgress

    out = io.StringIO()
    console = Console(file=out, width=200)
    item = SimpleNamespace(path=Path("a.png"))
    with ProtectProgress(2, 3, console=console, first_step_note="first {seconds:.1f} s") as bars:
        for _ in range(2):
            bars.image_started(item, 1)
            for step in range(1, 4):
                bars.step(step, 3)
    assert out.getvalue().count("first ") == 1
    quiet = io.StringIO()
    with ProtectProgress(1, 2, console=Console(file=quiet, width=200)) as bars:
        bars.image_started(item, 1)
        bars.step(1, 2)
    assert "first" not in quiet.getvalue()


def test_a_log_gets_one_unwrapped_line_per_finished_image():
    """Not a terminal (a log, nohup): no bars to watch, so each image says it is done, and a
    long path is never split across lines."""
    import io

    from rich.console import Console

    from mimicshield.cli.progress import ProtectProgress
    from mimicshield.runner import FileResult

    log = io.StringIO()
    long_name = "/photos/" + "a-rather-long-folder-name/" * 4 + "portrait.png"
    with ProtectProgress(2, 1, console=Console(file=log, width=80)) as bars:
        bars.image_done(FileResult("b.png", None, "failed", f"{long_name}: not an image"))
        bars.image_done(FileResult(long_name, "out.png", "protected"))
    lines = log.getvalue().splitlines()
    # the count is of images done, the failed one included; it does not read "2 protected"
    assert f"2/2 done: protected {long_name}" in lines
    assert f"failed {long_name}: not an image" in lines


def test_compile_on_the_cpu_warns_that_it_is_slower(tmp_path, folder, preloaded, monkeypatch):
    monkeypatch.setattr("mimicshield.performance.compile_model", lambda model, **kwargs: 0.0)
    result = invoke(str(folder / "art.png"), "-o", str(tmp_path / "out"), "--compile")
    assert result.exit_code == 0, result.output
    assert "slower on the CPU" in " ".join(result.output.split())


def test_cuda_graphs_off_cuda_warns_that_they_do_nothing(tmp_path, folder, preloaded):
    result = invoke(str(folder / "art.png"), "-o", str(tmp_path / "out"), "--cuda-graphs")
    assert result.exit_code == 0, result.output
    assert "--cuda-graphs does nothing on cpu" in " ".join(result.output.split())
    plain = invoke(str(folder / "art.png"), "-o", str(tmp_path / "plain"))
    assert "cuda-graphs" not in plain.output


def test_a_small_image_is_protected_at_its_own_size(tmp_path, preloaded):
    """At the default work size a thumbnail must still carry a perturbation (it is not upscaled,
    which would average the perturbation away on the way back)."""
    image = tmp_path / "thumb.png"
    Image.fromarray(noise(40, 48, seed=9)).save(image)
    defaults = ["--work-size", "512", "--method", "sds-", "--steps", "3", "--step-size", "1"]
    result = invoke(str(image), "-o", str(tmp_path / "out"), *defaults)
    assert result.exit_code == 0, result.output
    changed = np.asarray(Image.open(tmp_path / "out" / "thumb.png")).astype(int)
    # three signed steps of 1/255 move most pixels; averaged away, few would move at all
    assert np.abs(changed - np.asarray(Image.open(image)).astype(int)).mean() > 0.5


def test_a_manifest_json_that_is_not_ours_is_never_overwritten(tmp_path, folder):
    out = tmp_path / "out"
    out.mkdir()
    for text in ('{"my": "important data"}', "not json"):
        (out / "manifest.json").write_text(text)
        result = invoke(str(folder), "-o", str(out))
        assert isinstance(result.exception, CLIError), result.output
        assert "not written by mimicshield" in str(result.exception)
        assert (out / "manifest.json").read_text() == text


def test_the_overall_bar_counts_images_and_the_current_one_steps():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from mimicshield.cli.progress import ProtectProgress

    out = io.StringIO()
    item = SimpleNamespace(path=Path("a.png"))
    done = SimpleNamespace(status="protected", error=None, note=None, input="a.png")
    with ProtectProgress(3, 4, console=Console(file=out, width=200)) as bars:
        bars.image_started(item, 1)
        bars.step(1, 4)
        bars.step(2, 4)
        fields = {task.description: task.fields["count"] for task in bars.progress.tasks}
        assert fields == {"all images": "0/3 images", "a.png": "step 2/4"}
        bars.step(3, 4)
        bars.step(4, 4)
        bars.image_done(done)
        bars.image_done(SimpleNamespace(status="skipped", error=None, note=None, input="b.png"))
        overall = bars.progress.tasks[0]
        assert overall.fields["count"] == "2/3 images" and overall.completed == 8


def test_an_empty_prompt_is_kept(tmp_path, folder, preloaded):
    result = invoke(str(folder / "art.png"), "-o", str(tmp_path / "out"), "--prompt", "")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parameters"]["prompt"] == ""


def test_the_current_bar_says_when_an_image_is_being_saved():
    """After the last step a large image is quantized, written and measured for seconds: the
    bar names that phase instead of sitting silent at 100 %."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from mimicshield.cli.progress import ProtectProgress

    item = SimpleNamespace(path=Path("photos/big.png"))
    with ProtectProgress(1, 2, console=Console(file=io.StringIO(), width=200)) as bars:
        bars.image_started(item, 1)
        bars.step(2, 2)
        bars.saving(item)
        assert bars.progress.tasks[1].description == "saving big.png ..."


def test_a_file_where_an_output_subfolder_goes_is_explained(tmp_path, preloaded):
    """As purify says it: the file in the way, not ``[Errno 17] File exists``."""
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    Image.fromarray(noise(24, 32, seed=1)).save(source / "sub" / "a.png")
    out = tmp_path / "blk"
    out.mkdir()
    (out / "sub").write_text("a file of the user's")
    result = invoke(str(source), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert f"{out / 'sub'} is a file, where a folder would go" in result.output
    assert "Errno" not in result.output and (out / "sub").read_text() == "a file of the user's"


def test_file_names_in_progress_bars_are_text_not_markup():
    """Names like rich markup show as named ("[i]" would vanish, "[/x]" raise MarkupError)."""
    from rich.console import Console

    from mimicshield.cli.mimic import RichProgress
    from mimicshield.cli.progress import ProtectProgress

    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    item = SimpleNamespace(path=Path("sketch [bold] [i].png"))
    with ProtectProgress(1, 2, console) as progress:
        progress.image_started(item, 1)
        assert progress.progress.tasks[1].description == escape("sketch [bold] [i].png")
        progress.saving(item)
    with RichProgress(console) as bar:
        bar.start("sds- ([/x] folder)", 1)
    text = console.file.getvalue()
    assert "sketch [bold] [i].png" in text and "sds- ([/x] folder)" in text
