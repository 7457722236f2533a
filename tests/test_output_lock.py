"""One run at a time per output folder (``OUT/.mimicshield.lock``), and folders made from
Python resumed by the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fake_engines import NoiseEngine
from filelock import FileLock
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.main import CLIError, app
from mimicshield.protector import DEFAULT_PROMPT, Protector
from mimicshield.runner import (
    LOCK_NAME,
    MANIFEST_NAME,
    LockFileError,
    OutputBusyError,
    OutputOptions,
    output_lock,
    protect_files,
    scan_folder,
)

FAST = ["--method", "encoder", "--steps", "1", "--step-size", "4", "--eps", "8"]
FAST += ["--work-size", "native", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(24, 32, seed=1)).save(folder / "art.png")
    Image.fromarray(noise(29, 37, seed=2)).save(folder / "photo.png")
    return folder


@pytest.fixture
def model_never_loads(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a refused run must not load a model")

    monkeypatch.setattr("mimicshield.models.load_models", no_model)


@pytest.fixture
def preloaded(monkeypatch, tiny_model):
    monkeypatch.setattr(
        "mimicshield.models.load_models",
        lambda *args, **kwargs: dataclasses.replace(tiny_model, _prompt_cache={}),
    )


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "300"}).invoke(app, list(args))


def busy_line(out) -> str:
    return (
        f"{out} is being written by another mimicshield run (lock file {out / LOCK_NAME}); "
        "wait for it to finish."
    )


@pytest.mark.parametrize("command", [["protect", *FAST], ["purify", "-m", "jpeg75"]])
def test_a_second_run_into_a_held_folder_is_refused_at_once_touching_nothing(
    tmp_path, folder, command, model_never_loads
):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / LOCK_NAME, timeout=0):  # the other run, writing
        result = invoke(*command, str(folder), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, CLIError)
    assert str(result.exception) == busy_line(out)
    assert [path.name for path in out.iterdir()] == [LOCK_NAME]  # nothing written


def test_protect_files_refuses_a_held_folder_too(tmp_path, folder):
    out = tmp_path / "out"
    out.mkdir()
    protector = Protector(NoiseEngine(eps=4 / 255), "encoder", eps=4 / 255, steps=1)
    with FileLock(out / LOCK_NAME, timeout=0), pytest.raises(OutputBusyError):
        protect_files(sorted(folder.iterdir()), out, protector)
    assert [path.name for path in out.iterdir()] == [LOCK_NAME]


def test_a_leftover_lock_file_does_not_block_and_a_run_releases_the_lock(
    tmp_path, folder, preloaded, tiny_model_dir
):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("")  # left by a killed run: no process holds it
    args = ["protect", *FAST, str(folder), "-o", str(out), "--model", str(tiny_model_dir)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    with FileLock(out / LOCK_NAME, timeout=0):  # released: another process could take it
        pass
    again = invoke(*args)  # and a second run after the first resumes
    assert again.exit_code == 0, again.output
    statuses = [
        entry["status"] for entry in json.loads((out / MANIFEST_NAME).read_text())["images"]
    ]
    assert statuses == ["skipped", "skipped"]
    assert scan_folder(out).images == sorted(out.glob("*.png"))  # the lock is no input
    assert LOCK_NAME not in scan_folder(out).other_types and scan_folder(out).other_types == {}


def test_a_folder_made_only_for_the_lock_is_removed_again(tmp_path, folder, monkeypatch):
    def failed_load(*args, **kwargs):
        raise CLIError("no such model")

    monkeypatch.setattr("mimicshield.models.load_models", failed_load)
    out = tmp_path / "new" / "a" / "b" / "out"
    result = invoke("protect", *FAST, str(folder), "-o", str(out))
    assert str(result.exception) == "no such model"
    assert sorted(tmp_path.iterdir()) == [folder]  # the missing parents made for it too


def test_only_the_empty_folders_made_for_the_lock_are_removed(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with output_lock(kept / "a" / "b" / "out"):
        (kept / "a" / "notes.txt").write_text("written while held")
    assert sorted(kept.rglob("*")) == [kept / "a", kept / "a" / "notes.txt"]
    with output_lock(kept / "c" / "out"):
        (kept / "c" / "out" / "art.png").write_bytes(b"")
    assert (kept / "c" / "out" / "art.png").exists()


def test_a_lock_file_windows_cannot_remove_while_held_goes_once_released(tmp_path, monkeypatch):
    """Windows cannot remove an open file: the folder made for the lock goes all the same."""
    released: list[bool] = []
    release, unlink = FileLock.release, Path.unlink

    def noted_release(self, *args, **kwargs):
        release(self, *args, **kwargs)
        released.append(True)

    def windows_unlink(path, *args, **kwargs):
        if path.name == LOCK_NAME and not released:
            raise PermissionError(13, "The process cannot access the file", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(FileLock, "release", noted_release)
    monkeypatch.setattr(Path, "unlink", windows_unlink)
    with output_lock(tmp_path / "new" / "out"):
        pass
    assert released and list(tmp_path.iterdir()) == []


def lock_file_line(out) -> str:
    return (
        f"{out}: cannot create the lock file {out / LOCK_NAME} (permission denied); choose an "
        "output folder you can write to."
    )


def refuse_lock_file(monkeypatch) -> None:
    """As another user's lock file (mode 0644 in a shared folder), or a read-only folder."""

    def acquire(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(FileLock, "acquire", acquire)


def test_a_lock_file_that_cannot_be_made_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    refuse_lock_file(monkeypatch)
    out = tmp_path / "new" / "out"
    with pytest.raises(LockFileError) as refused, output_lock(out):
        raise AssertionError("not taken: nothing may be written")
    assert str(refused.value) == lock_file_line(out)
    assert not (tmp_path / "new").exists()  # the folders made for it removed again


def test_a_file_where_the_output_folder_would_go_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    with pytest.raises(LockFileError) as refused, output_lock(out):
        pass
    assert str(refused.value) == (
        f"{out}: cannot create the lock file {out / LOCK_NAME} ({tmp_path / 'file'} is a file, "
        "where a folder would go); choose an output folder you can write to."
    )


@pytest.mark.parametrize("command", [["protect", *FAST], ["purify", "-m", "jpeg75"]])
def test_the_cli_says_a_lock_file_that_cannot_be_made_in_one_line(
    tmp_path, folder, monkeypatch, command, model_never_loads
):
    refuse_lock_file(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*command, str(folder), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, CLIError)  # "Error: ..." with no debugging hint
    assert str(result.exception) == lock_file_line(out)
    assert list(out.iterdir()) == []


def _api_protector(model) -> Protector:
    """The protector the CLI builds from FAST."""
    return Protector(
        model, "encoder", eps=8 / 255, step_size=4 / 255, steps=1, prompt=DEFAULT_PROMPT, seed=0
    )


def test_a_folder_made_from_python_resumes_through_the_cli(
    tmp_path, folder, monkeypatch, preloaded, tiny_model, tiny_model_dir
):
    monkeypatch.chdir(tiny_model_dir.parent)  # the model named by a relative path, as users do
    relative = dataclasses.replace(tiny_model, name=f"./{tiny_model_dir.name}", _prompt_cache={})
    out = tmp_path / "out"
    files = sorted(folder.iterdir())
    protect_files(files, out, _api_protector(relative), options=OutputOptions(work_size=None))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model"] == str(tiny_model_dir.resolve())  # as the CLI records it
    args = ["protect", *FAST, str(folder), "-o", str(out), "--model", f"./{tiny_model_dir.name}"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    entries = json.loads((out / MANIFEST_NAME).read_text())["images"]
    assert [entry["status"] for entry in entries] == ["skipped", "skipped"]


def test_a_manifest_python_wrote_before_still_resumes_through_the_cli(
    tmp_path, folder, monkeypatch, preloaded, tiny_model, tiny_model_dir
):
    """Written as Python recorded it before: the model in a list, by its relative path, and
    no target as ``target_sha256``; so under another settings id."""
    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "out"
    protect_files(
        sorted(folder.iterdir()),
        out,
        _api_protector(tiny_model),
        options=OutputOptions(work_size=None),
    )
    path = out / MANIFEST_NAME
    text = path.read_text().replace(json.loads(path.read_text())["settings"], "0ld5e771n65")
    manifest = json.loads(text)
    for run in (manifest, *manifest["runs"]):
        run["model"] = [f"./{tiny_model_dir.name}"]
        parameters = run["parameters"]
        parameters["target_sha256"] = parameters.pop("target")
    path.write_text(json.dumps(manifest))
    result = invoke("protect", *FAST, str(folder), "-o", str(out), "--model", str(tiny_model_dir))
    assert result.exit_code == 0, result.output
    entries = json.loads(path.read_text())["images"]
    assert [entry["status"] for entry in entries] == ["skipped", "skipped"]


def test_other_settings_are_still_refused(tmp_path, folder, preloaded, tiny_model, tiny_model_dir):
    out = tmp_path / "out"
    protector = _api_protector(tiny_model)
    protect_files(sorted(folder.iterdir()), out, protector, options=OutputOptions(work_size=None))
    args = ["protect", *FAST, "--seed", "1", str(folder), "-o", str(out)]
    result = invoke(*args, "--model", str(tiny_model_dir))
    assert result.exit_code == 1
    assert "different settings (seed 0 -> 1)" in result.output
