"""The command line end to end: a folder in, a folder out, a manifest, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.main import app
from mimicshield.methods import METHODS

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a real process, so the one-line error path is exercised."""
    command = [sys.executable, "-m", "mimicshield.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture
def input_folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        folder / "nested" / "b.png"
    )
    return folder


def test_methods_lists_eight_methods_one_line_each():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(METHODS) == 8
    assert [line.split()[0] for line in lines] == list(METHODS)


def test_protect_folder_writes_outputs_and_manifest(tiny_model_dir, input_folder, tmp_path):
    out = tmp_path / "out"
    args = ["protect", str(input_folder), "-o", str(out), "--model", str(tiny_model_dir)]
    options = ["--steps", "2", "--eps", "8", "--seed", "3", "--work-size", "native"]
    result = runner.invoke(app, [*args, *options], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (out / "a.png").is_file() and (out / "nested" / "b.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(tiny_model_dir)
    assert manifest["parameters"]["method"] == "sds-"
    assert manifest["parameters"]["steps"] == 2 and manifest["seed"] == 3
    assert manifest["mimicshield_version"]
    assert manifest["deterministic"] is True
    entries = {e["output"]: e for e in manifest["images"]}
    assert set(entries) == {"a.png", "nested/b.png"}  # relative to OUT
    for entry in entries.values():
        assert entry["status"] == "protected"
        assert entry["linf_255"] <= 8 and entry["psnr"] > 30
    clean = np.asarray(Image.open(input_folder / "a.png")).astype(int)
    protected = np.asarray(Image.open(out / "a.png")).astype(int)
    assert protected.shape == clean.shape
    assert np.abs(protected - clean).max() <= 8
    assert "PSNR" in result.stdout and "a.png" in result.stdout


def test_nondeterministic_is_recorded_and_gives_the_same_file_on_the_cpu(
    tiny_model_dir, input_folder, tmp_path
):
    """The CPU's kernels are deterministic either way: only CUDA has faster, looser ones."""
    outputs = {}
    for flags in ((), ("--nondeterministic",)):
        out = tmp_path / ("loose" if flags else "strict")
        args = ["protect", str(input_folder / "a.png"), "-o", str(out), "--model"]
        args += [str(tiny_model_dir), "--steps", "2", "--work-size", "native", *flags]
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["deterministic"] is (not flags)
        outputs[flags] = (out / "a.png").read_bytes()
    assert outputs[()] == outputs[("--nondeterministic",)]


def test_flag_conflicts_give_one_line_errors(tiny_model_dir, input_folder, tmp_path):
    base = ["protect", str(input_folder), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir)]
    both = run_cli(*base, "--prompt", "x", "--category", "anime")
    assert both.returncode == 1
    assert "Give --prompt or --category, not both." in both.stderr
    assert "Traceback" not in both.stderr
    target = run_cli(*base, "--target", str(input_folder / "a.png"))
    assert target.returncode == 1 and "--target is only used by" in target.stderr


def test_missing_model_is_one_clear_line(input_folder, tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = run_cli("protect", str(input_folder), "-o", str(tmp_path / "o"), "--model", missing)
    assert result.returncode == 1
    assert "no such model folder" in result.stderr and "Traceback" not in result.stderr


def test_help_does_not_import_torch():
    """`mimicshield --help` must answer at once: the CLI loads torch only inside commands."""
    code = (
        "import sys; from mimicshield.cli.main import app; import mimicshield;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_an_output_folder_that_cannot_be_made_fails_before_the_model_loads(input_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "protected"  # a folder inside a file: never creatable, even as root
    missing_model = str(tmp_path / "no-such-model")
    result = run_cli("protect", str(input_folder), "-o", str(out), "--model", missing_model)
    assert result.returncode == 1
    assert f"-o {out}: cannot write there" in result.stderr
    assert "no such model" not in result.stderr  # it stopped before loading
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["protect", "purify"])
def test_the_input_folder_as_output_folder_is_refused_before_anything_is_written(
    command, input_folder, tmp_path
):
    before = sorted(p.name for p in input_folder.iterdir())
    args = [command, str(input_folder), "-o", str(input_folder)]
    args += ["--model", str(tmp_path / "unused")] if command == "protect" else ["-m", "jpeg75"]
    result = run_cli(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is the input folder" in result.stderr and "protected" in result.stderr
    assert sorted(p.name for p in input_folder.iterdir()) == before  # nothing written there


def test_eps_on_the_unit_scale_is_refused_with_the_likely_meaning(input_folder, tmp_path):
    result = run_cli(
        "protect", str(input_folder), "-o", str(tmp_path / "o"), "--eps", "0.03", "--model", "x"
    )
    assert result.returncode == 1
    assert "1/255 units" in result.stderr and "did you mean 8?" in result.stderr


def test_output_that_is_a_file_is_refused_and_left_alone(input_folder, tmp_path):
    target = input_folder / "a.png"
    before = target.read_bytes()
    unused = str(tmp_path / "unused")
    result = run_cli("protect", str(input_folder), "-o", str(target), "--model", unused)
    assert result.returncode == 1
    assert "exists and is not a folder" in result.stderr and "Traceback" not in result.stderr
    assert target.read_bytes() == before


def test_version_is_printed_without_loading_anything():
    from mimicshield import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mimicshield {__version__}"


def test_a_proxy_error_from_the_hub_is_one_line(input_folder, tmp_path, monkeypatch, capsys):
    """huggingface_hub 2.x lets its HTTP client's errors through (a proxy refusing the
    connection is no OSError): they end as one ``Error:`` line, not a traceback."""
    httpx2 = pytest.importorskip("httpx2")
    from mimicshield import models
    from mimicshield.cli.main import main

    def behind_a_proxy(*args, **kwargs):
        raise httpx2.ProxyError("407 Proxy Authentication Required")

    monkeypatch.setattr(models, "load_models", behind_a_proxy)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mimicshield", "protect", str(input_folder), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("Error: 407 Proxy Authentication Required")


@pytest.mark.parametrize("debug", [False, True])
def test_warnings_are_one_line_and_library_deprecations_are_left_out(
    input_folder, tmp_path, monkeypatch, capsys, recwarn, debug
):
    import warnings

    from mimicshield import models
    from mimicshield.cli.main import main

    def warning_load(*args, **kwargs):
        warnings.warn("model.safetensors: --model-config\n  is ignored", stacklevel=2)
        warnings.warn("`upcast_vae` is deprecated", FutureWarning, stacklevel=2)
        raise models.ModelLoadError("stop here")

    if debug:
        monkeypatch.setenv("MIMICSHIELD_DEBUG", "1")
    else:
        monkeypatch.delenv("MIMICSHIELD_DEBUG", raising=False)
    monkeypatch.setattr(models, "load_models", warning_load)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mimicshield", "protect", str(input_folder), "-o", str(out)])
    showwarning = warnings.showwarning
    with pytest.raises((SystemExit, models.ModelLoadError)):
        main()
    err = capsys.readouterr().err
    assert warnings.showwarning is showwarning  # put back after the command
    if debug:  # left to Python (here pytest, which records them)
        assert "warning:" not in err
        assert "--model-config\n  is ignored" in str(recwarn.pop(UserWarning).message)
    else:
        lines = err.splitlines()
        assert lines[0] == "warning: model.safetensors: --model-config is ignored"
        assert lines[1] == "Error: stop here"
        assert "upcast_vae" not in err and "Warning" not in err


def test_sigterm_is_handled_as_ctrl_c_and_exits_143(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``kill``/``timeout`` end a run with SIGTERM: protect says what was saved and how to go
    on, as after Ctrl-C, and exits 143 (before, the process died silently)."""
    import os
    import signal

    from mimicshield.cli import main as cli_main

    def protect_files(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises inside this call
        pytest.fail("SIGTERM did not interrupt the run")

    monkeypatch.setattr("mimicshield.runner.protect_files", protect_files)
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    args = ["mimicshield", "protect", str(image), "-o", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [*args, "--model", str(tiny_model_dir), "--device", "cpu"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 143
    assert "Interrupted." in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the CLI's only
