"""Bad input files and folders: each is reported with the file and the problem, none is lost.

Most of these run ``purify`` with purifications that need no model (blur, jpeg75), or the
runner with a stand-in engine: what they check is how inputs are collected and outputs written.
"""

from __future__ import annotations

import json
import os

import pytest
from fake_engines import NoiseEngine
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield import __version__
from mimicshield.cli.errors import CLIError
from mimicshield.cli.main import app
from mimicshield.purify import PURIFICATIONS
from mimicshield.runner import (
    MANIFEST_NAME,
    PURIFY_RECORD_NAME,
    OutputOptions,
    RecordError,
    collect_inputs,
    load_manifest,
    output_folder_problem,
    protect_files,
    scan_inputs,
)

NATIVE = OutputOptions(work_size=None)
HEADER = {"model": "tiny"}


def _image(path, seed=0, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(*size, seed=seed)).save(path)
    return path


def purify(*args: str):
    return CliRunner().invoke(app, ["purify", *args], env={"COLUMNS": "200"})


def _earlier_run(folder, record=MANIFEST_NAME):
    """A folder as an earlier run leaves it: an image and the run's record."""
    _image(folder / "a.png", seed=9)
    (folder / record).write_text(json.dumps({"mimicshield_version": __version__}))
    return folder


# --- 1. broken links and empty folders ------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """One good image, a dangling link, a link to itself and a folder without images."""
    good = _image(tmp_path / "good.png")
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    (tmp_path / "dir.png").mkdir()
    return tmp_path, good


def test_broken_links_and_empty_folders_are_failures_not_silence(mixed):
    folder, good = mixed
    names = ["dangling.png", "loop.png", "dir.png"]
    files, missing = collect_inputs([str(folder / n) for n in names] + [str(good)])
    assert [f.path for f in files] == [good]
    errors = [result.error for result in missing]
    assert "broken symbolic link" in errors[0] and "nowhere.png" in errors[0]
    assert "broken symbolic link" in errors[1]
    assert errors[2] == f"{folder / 'dir.png'}: no images in this folder."


def test_purify_reports_them_at_the_end_and_exits_1(mixed, tmp_path):
    folder, good = mixed
    out = tmp_path / "out"
    arguments = [str(folder / n) for n in ("dangling.png", "loop.png", "dir.png")]
    result = purify(*arguments, str(good), "-o", str(out), "-m", "blur")
    assert result.exit_code == 1, result.output
    assert (out / "blur" / "good.png").is_file()
    assert result.output.count("failed:") == 3
    assert "no images in this folder" in result.output


def test_a_single_broken_input_is_named_instead_of_no_image_files_found(mixed, tmp_path):
    folder, _ = mixed
    for name, problem in [("dangling.png", "broken symbolic link"), ("dir.png", "no images")]:
        result = purify(str(folder / name), "-o", str(tmp_path / "out"), "-m", "blur")
        assert isinstance(result.exception, CLIError)
        assert problem in str(result.exception) and name in str(result.exception)
        assert "No image files found" not in str(result.exception)


def test_a_pattern_matching_nothing_is_not_called_a_missing_file(tmp_path):
    _, missing = collect_inputs([str(tmp_path / "nomatch" / "*.png"), str(tmp_path / "a.png")])
    assert [result.error for result in missing] == [
        f"{tmp_path / 'nomatch' / '*.png'}: the pattern matches no file.",
        f"{tmp_path / 'a.png'}: no such file.",
    ]
    result = purify(str(tmp_path / "nomatch" / "[ab].png"), "-o", str(tmp_path / "out"))
    assert isinstance(result.exception, CLIError)
    assert "[ab].png: the pattern matches no file." in str(result.exception)


def test_a_yes_no_word_after_a_flag_is_said_to_be_no_file(tmp_path, monkeypatch):
    """typer's help shows <bool> beside flags, so a user writes --low-memory true; "true"
    then reads as an input, which the error explains."""
    monkeypatch.chdir(tmp_path)
    _, missing = collect_inputs(["true", "Off", "photo.png"])
    assert [result.error for result in missing] == [
        "true: no such file (flags take no value: write --low-memory, not --low-memory true).",
        "Off: no such file (flags take no value: write --low-memory, not --low-memory true).",
        "photo.png: no such file.",
    ]


def test_a_broken_link_inside_a_folder_is_a_failure(tmp_path):
    _image(tmp_path / "in" / "a.png")
    os.symlink("gone.png", tmp_path / "in" / "b.png")
    files, missing = collect_inputs([str(tmp_path / "in")])
    assert len(files) == 1
    assert len(missing) == 1 and missing[0].error.startswith(str(tmp_path / "in" / "b.png"))


# --- 11. earlier runs' folders, and -o among the originals ------------------------------------


def test_folders_of_earlier_runs_are_skipped_with_a_note(tmp_path):
    folder = tmp_path / "photos"
    _image(folder / "img1.png")
    _earlier_run(folder / "protected")
    _earlier_run(folder / "mimicked", record="mimic.json")
    _image(folder / "mine" / "b.png")
    (folder / "mine" / MANIFEST_NAME).write_text('{"someone": "else"}')  # not ours: read
    scan = scan_inputs([str(folder)], exclude=folder / "protected-eps8")
    assert sorted(f.relative.as_posix() for f in scan.files) == ["img1.png", "mine/b.png"]
    (note,) = [note for note in scan.notes if "folder(s)" in note]
    assert "skipped 2 folder(s)" in note and str(folder / "protected") in note
    # named directly, an earlier run's folder is read
    assert len(scan_inputs([str(folder / "protected")]).files) == 1


def test_protecting_twice_into_sibling_folders_does_not_protect_the_first_outputs(tmp_path):
    """The auditor's nest2: protect nest2 -o nest2/protected; then -o nest2/protected-eps8."""
    folder = tmp_path / "nest2"
    for i in range(2):
        _image(folder / f"img{i}.png", seed=i)
    engine = NoiseEngine(eps=4 / 255)
    for out in (folder / "protected", folder / "protected-eps8"):
        files, _ = collect_inputs([str(folder)], exclude=out)
        protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
    outputs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert outputs == [
        "img0.png",
        "img1.png",
        "protected-eps8/img0.png",
        "protected-eps8/img1.png",
        "protected/img0.png",
        "protected/img1.png",
    ]


def test_other_file_types_in_a_folder_are_counted_in_a_note(tmp_path):
    _image(tmp_path / "in" / "a.png")
    for name in ("b.gif", "c.avif", "d.avif"):
        (tmp_path / "in" / name).write_bytes(b"x")
    scan = scan_inputs([str(tmp_path / "in")])
    assert len(scan.files) == 1 and not scan.missing
    assert any("3 file(s) of other types (.avif, .gif)" in note for note in scan.notes)
    result = purify(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "blur")
    assert result.exit_code == 0 and "3 file(s) of other types" in result.output


def test_a_folder_of_other_types_only_says_what_it_holds(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.gif").write_bytes(b"x")
    result = purify(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "blur")
    assert isinstance(result.exception, CLIError)
    assert "no images in this folder (only 1 file(s) of other types (.gif))" in str(
        result.exception
    )


@pytest.mark.parametrize("kind", ["files", "pattern"])
def test_the_folder_of_named_files_or_a_pattern_is_refused_as_output(tmp_path, kind):
    """The auditor's sam/: protect sam/a.png sam/b.jpg -o sam wrote beside the originals."""
    folder = tmp_path / "sam"
    a, b = _image(folder / "a.png"), _image(folder / "b.jpg")
    original = (folder / "a.png").read_bytes()
    arguments = [str(a), str(b)] if kind == "files" else [str(folder / "*.png")]
    assert "among the originals" in output_folder_problem(arguments, folder)
    result = purify(*arguments, "-o", str(folder), "-m", "blur")
    assert isinstance(result.exception, CLIError) and "among the originals" in str(result.exception)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.jpg"]
    assert (folder / "a.png").read_bytes() == original


# --- 4. no truncated PNG under the final name ------------------------------------------------


def test_save_png_never_leaves_a_partial_file_under_the_final_name(tmp_path, monkeypatch):
    import torch

    from mimicshield import images

    destination = tmp_path / "out" / "a.png"
    images.save_png(torch.zeros(3, 8, 8), destination)
    before = destination.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(torch.ones(3, 8, 8), destination)
    assert destination.read_bytes() == before  # the earlier file, whole
    assert sorted(p.name for p in destination.parent.iterdir()) == ["a.png"]  # no .part left


def test_purify_interrupted_says_so_and_leaves_only_whole_files(tmp_path, interrupt_second_save):
    for i in range(3):
        _image(tmp_path / "in" / f"img{i}.png", seed=i)
    out = tmp_path / "out"
    result = purify(str(tmp_path / "in"), "-o", str(out), "-m", "blur")
    assert result.exit_code == 130
    assert "Interrupted" in result.output and "1 image(s)" in result.output
    assert [p.name for p in (out / "blur").iterdir()] == ["img0.png"]
    Image.open(out / "blur" / "img0.png").load()  # complete


# --- 14. -o a broken link, a file where a purification's folder goes -------------------------


def test_an_output_folder_that_is_a_broken_link_is_refused_first(tmp_path):
    good = _image(tmp_path / "good.png")
    os.symlink(tmp_path / "nowhere", tmp_path / "out")
    result = purify(str(good), "-o", str(tmp_path / "out"), "-m", "blur")
    assert isinstance(result.exception, CLIError)
    assert "broken symbolic link" in str(result.exception)


def test_a_file_blocking_one_purification_folder_fails_those_files_only(tmp_path):
    good = _image(tmp_path / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "blur").write_text("a file of the user's")
    result = purify(str(good), "-o", str(out), "-m", "blur,jpeg75")
    assert result.exit_code == 1, result.output
    assert "could not write" in result.output and "is a file" in result.output
    assert (out / "jpeg75" / "good.png").is_file()
    assert (out / "blur").read_text() == "a file of the user's"


# --- 14. resume after a crash between saving an output and the manifest ----------------------


def test_a_crash_before_the_manifest_update_is_explained_on_every_rerun(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "a.png", seed=1)
    engine = NoiseEngine(eps=4 / 255)
    files, _ = collect_inputs([str(folder)], exclude=out)
    protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
    manifest = load_manifest(out)  # the crash: the output renamed, the manifest not updated
    manifest["images"] = []
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    for _ in range(2):  # the second rerun sees the failure the first one recorded
        report = protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
        (result,) = report.results
        assert result.status == "failed"
        assert "not recorded in the manifest as finished" in result.error
        assert "does not match" not in result.error and "--overwrite" in result.error


def test_only_partial_files_of_this_runs_outputs_are_removed(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "a.png", seed=2)
    ours = out / ".a.png.0123abcd.part"
    theirs = [out / ".film.mkv.0123abcd.part", out / "sub" / ".b.png.89abcdef.part"]
    for path in (ours, *theirs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    files, _ = collect_inputs([str(folder)], exclude=out)
    protect_files(files, out, NoiseEngine(eps=4 / 255), options=NATIVE, manifest_header=HEADER)
    assert not ours.exists()
    assert all(path.read_bytes() == b"partial" for path in theirs)


# --- purify's record: its folder is an earlier run's -------------------------------------------


def test_purify_records_what_it_wrote_and_later_scans_skip_its_folder(tmp_path):
    """purify photos -o photos/purified, then protect photos -o photos/out: not purified/."""
    folder = tmp_path / "photos"
    inputs = [_image(folder / "img1.png"), _image(folder / "sub" / "img2.png", seed=1)]
    out = folder / "purified"
    assert purify(str(folder), "-o", str(out), "-m", "jpeg75,blur").exit_code == 0
    record = json.loads((out / PURIFY_RECORD_NAME).read_text())
    assert record["mimicshield_version"] == __version__
    described = {p["name"]: p for p in record["purifications"]}
    assert sorted(described) == ["blur", "jpeg75"]
    for name, description in described.items():
        assert description["parameters"] == PURIFICATIONS[name].parameters()
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    assert sorted(entry["output"] for entry in record["files"]) == written
    for entry in record["files"]:
        assert entry["settings"] == described[entry["purification"]]["settings"]
        assert entry["output"].startswith(entry["purification"] + "/")
    assert {entry["input"] for entry in record["files"]} == {str(path) for path in inputs}

    scan = scan_inputs([str(folder)], exclude=folder / "out")  # what protect reads
    assert sorted(f.relative.as_posix() for f in scan.files) == ["img1.png", "sub/img2.png"]
    assert any("skipped 1 folder(s)" in note and str(out) in note for note in scan.notes)
    again = purify(str(folder), "-o", str(folder / "again"), "-m", "blur")
    assert again.exit_code == 0 and "skipped 1 folder(s)" in again.output
    assert not (folder / "again" / "blur" / "purified").exists()

    # a later run into the same folder adds to the record; the earlier entries stay
    assert purify(str(inputs[0]), "-o", str(out), "-m", "noise").exit_code == 0
    record = json.loads((out / PURIFY_RECORD_NAME).read_text())
    assert sorted(p["name"] for p in record["purifications"]) == ["blur", "jpeg75", "noise"]
    assert len(record["files"]) == len(written) + 1


def test_purify_record_names_every_output_written_before_ctrl_c(tmp_path, interrupt_second_save):
    for i in range(3):
        _image(tmp_path / "in" / f"img{i}.png", seed=i)
    out = tmp_path / "out"
    assert purify(str(tmp_path / "in"), "-o", str(out), "-m", "blur").exit_code == 130
    record = json.loads((out / PURIFY_RECORD_NAME).read_text())
    assert [entry["output"] for entry in record["files"]] == ["blur/img0.png"]


def test_purify_never_replaces_a_record_that_is_not_its_own(tmp_path):
    good = _image(tmp_path / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / PURIFY_RECORD_NAME).write_text('{"mine": true}')
    result = purify(str(good), "-o", str(out), "-m", "blur")
    assert isinstance(result.exception, CLIError)
    assert "not written by mimicshield" in str(result.exception)
    assert (out / PURIFY_RECORD_NAME).read_text() == '{"mine": true}'
    assert not (out / "blur").exists()


# --- --overwrite keeps the files a user made read-only -----------------------------------------


def _read_only(path):
    os.chmod(path, 0o444)
    return path.read_bytes()


def test_purify_overwrite_keeps_a_read_only_output_and_does_the_rest(tmp_path):
    for i in range(2):
        _image(tmp_path / "in" / f"img{i}.png", seed=i)
    out = tmp_path / "out"
    assert purify(str(tmp_path / "in"), "-o", str(out), "-m", "blur").exit_code == 0
    kept = out / "blur" / "img0.png"
    before = _read_only(kept)
    (out / "blur" / "img1.png").write_bytes(b"stale")
    result = purify(str(tmp_path / "in"), "-o", str(out), "-m", "blur,jpeg75", "--overwrite")
    assert result.exit_code == 1, result.output
    assert f"{kept} is read-only; not replaced." in result.output
    assert kept.read_bytes() == before and os.stat(kept).st_mode & 0o777 == 0o444
    Image.open(out / "blur" / "img1.png").load()  # the rest of the batch is done
    assert (out / "jpeg75" / "img0.png").is_file()  # and the other purification of img0
    assert "Wrote 3 images" in result.output


def test_a_file_blocking_an_output_subfolder_is_named_by_protect_too(tmp_path):
    """protect words it as purify does: the file in the way, not ``[Errno 17] File exists``."""
    _image(tmp_path / "in" / "sub" / "a.png")
    _image(tmp_path / "in" / "b.png", seed=1)
    out = tmp_path / "blk"
    out.mkdir()
    (out / "sub").write_text("a file of the user's")
    files, _ = collect_inputs([str(tmp_path / "in")], exclude=out)
    report = protect_files(
        files, out, NoiseEngine(eps=4 / 255), options=NATIVE, manifest_header=HEADER
    )
    by_name = {result.relative: result for result in report.results}
    assert by_name["b.png"].status == "protected"
    assert by_name["sub/a.png"].error == (
        f"{tmp_path / 'in' / 'sub' / 'a.png'}: could not write {out / 'sub' / 'a.png'} "
        f"({out / 'sub'} is a file, where a folder would go)."
    )


def test_protect_overwrite_keeps_a_read_only_output_and_does_the_rest(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        _image(folder / f"img{i}.png", seed=i)
    files, _ = collect_inputs([str(folder)], exclude=out)
    engine = NoiseEngine(eps=4 / 255)
    protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
    before = _read_only(out / "img0.png")
    report = protect_files(
        files, out, engine, options=NATIVE, manifest_header=HEADER, overwrite=True
    )
    by_name = {result.relative: result for result in report.results}
    assert by_name["img0.png"].status == "failed"
    assert f"{out / 'img0.png'} is read-only; not replaced" in by_name["img0.png"].error
    assert by_name["img1.png"].status == "protected"
    assert (out / "img0.png").read_bytes() == before
    # its entry still vouches for the kept output: a plain rerun finds it done
    report = protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
    assert {result.status for result in report.results} == {"skipped"}


def test_a_read_only_manifest_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "img0.png")
    files, _ = collect_inputs([str(folder)], exclude=out)
    engine = NoiseEngine(eps=4 / 255)
    protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER)
    before = _read_only(out / MANIFEST_NAME)
    with pytest.raises(RecordError, match="read-only; not replaced"):
        protect_files(files, out, engine, options=NATIVE, manifest_header=HEADER, overwrite=True)
    assert (out / MANIFEST_NAME).read_bytes() == before

    monkeypatch.setattr("mimicshield.models.load_models", lambda *a, **k: pytest.fail("loaded"))
    result = CliRunner().invoke(app, ["protect", str(folder), "-o", str(out), "--overwrite"])
    assert isinstance(result.exception, CLIError)
    assert str(result.exception).count("\n") == 0 and "read-only" in str(result.exception)
