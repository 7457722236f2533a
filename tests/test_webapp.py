"""``mimicshield ui``: uploads, jobs, cancel, queue and clean-up; then the real app in Chromium.

The service tests call :class:`ProtectionService` directly (no browser); the last test starts
``mimicshield ui`` as a user would, with the tiny model, and drives it from headless Chromium.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, IMAGES, REPO_ROOT, WEIGHTS, requires_assets
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner
from web_cases import FAST

pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[ui]')")

from mimicshield import webapp  # noqa: E402
from mimicshield.cli.main import app as cli_app  # noqa: E402
from mimicshield.images import ImageFileError  # noqa: E402
from mimicshield.metadata import DMI_PROHIBITED_AIML  # noqa: E402
from mimicshield.webapp import (  # noqa: E402
    ADVANCED,
    JobCancelled,
    JobProgress,
    ProtectionService,
    ProtectSettings,
    UploadLimits,
    _settings_from_page,
    _unique_names,
    build_app,
    format_seconds,
    validate_uploads,
)

LPIPS_FILE = WEIGHTS / "lpips_alexnet.safetensors"
# fast settings: one step at a 32-pixel work size (the tiny model's native size)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def service(tmp_path, tiny_model_dir):
    settings = ProtectSettings(model=str(tiny_model_dir), **FAST)
    service = ProtectionService(settings, work_root=tmp_path / "work", lpips_weights=LPIPS_FILE)
    yield service
    service.close()


def _png(path: Path, height: int = 24, width: int = 32, seed: int = 0) -> Path:
    Image.fromarray(noise(height, width, seed=seed)).save(path)
    return path


def _uploads(service: ProtectionService, *paths: Path):
    accepted, problems = service.validate(paths)
    assert not problems, problems
    return accepted


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- uploads, settings, progress (no model) ---------------------------------------------------


def test_uploads_are_checked_by_content_size_pixels_and_count(tmp_path):
    good = _png(tmp_path / "good.png")
    renamed_text = tmp_path / "notes.png"
    renamed_text.write_text("not an image at all\n")
    gif = tmp_path / "anim.png"
    Image.fromarray(noise(8, 8)).convert("P").save(gif, format="GIF")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 100)).save(wide)
    heavy = tmp_path / "heavy.png"
    _png(heavy, 64, 64)
    limits = UploadLimits(max_images=4, max_file_bytes=4000, max_pixels=10_000)

    accepted, problems = validate_uploads([good, renamed_text, gif, wide, heavy], limits)

    assert [u.name for u in accepted] == ["good.png"]
    assert (accepted[0].width, accepted[0].height) == (32, 24)
    text = "\n".join(problems)
    assert "notes.png: not an image" in text and "whatever its name says" in text
    assert "anim.png: a GIF file" in text
    assert "wide.png: 200 × 100 pixels (0.02 MP) is more than this app's limit" in text
    assert "5 files uploaded; this app takes at most 4" in text  # heavy.png left out
    assert str(tmp_path) not in text  # messages name the file, never a server path
    _, problems = validate_uploads([heavy], limits)
    assert "heavy.png:" in problems[0] and "MB per file" in problems[0]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert validate_uploads([empty], limits)[1] == ["empty.png: empty file (0 bytes)."]
    service = ProtectionService(work_root=tmp_path / "w")
    try:  # a bad target image says it is the target
        with pytest.raises(ImageFileError, match="^Target image notes.png: not an image"):
            service.validate_target(renamed_text)
    finally:
        service.close()


def test_settings_make_the_same_checks_as_the_cli():
    assert ProtectSettings().method == "sds-" and ProtectSettings().eps == 16
    with pytest.raises(ValueError, match="not both"):
        ProtectSettings(prompt="a cat", category="anime")
    with pytest.raises(ValueError, match="only used by photoguard"):
        ProtectSettings(target="t.png")
    with pytest.raises(ValueError, match="Work size"):
        ProtectSettings(work_size="big")
    with pytest.raises(ValueError, match="Unknown method"):
        ProtectSettings(method="nope")
    with pytest.raises(ValueError, match="do not combine"):
        ProtectSettings(cuda_graphs=True, low_memory=True)
    with pytest.raises(ValueError, match="at least 0"):
        ProtectSettings(batch_size=-1)
    with pytest.raises(ValueError, match="Steps must be at least 1"):
        ProtectSettings(steps=0)
    with pytest.raises(ValueError, match="seed must be between 0 and"):
        ProtectSettings(seed=10**20)
    with pytest.raises(ValueError, match="α must be in"):
        ProtectSettings(step_size=0)
    assert ProtectSettings(category="anime").chosen_prompt == "an anime picture"


def test_the_page_offers_every_cli_option_and_the_presets_set_eps():
    import inspect

    from mimicshield.cli.protect import protect

    cli = set(inspect.signature(protect).parameters) - {"inputs", "out", "overwrite"}
    page = {"eps", "model"} | {name for name, _ in ADVANCED}
    assert cli == page  # a new CLI option must show up in the page too
    assert cli == {f.name for f in fields(ProtectSettings)}

    service = ProtectionService(work_root=None)
    values = {name: getattr(service.defaults, name) for name in page - {"eps"}}
    values.update(category="none", robust=["jpeg"], target=None, work_size="", model_config="")
    values.update(model="a/model\n./other-model", model_weight="1, 3", family="sd1\nauto")
    try:
        assert _settings_from_page(service, values, "light", 30).eps == 8
        assert _settings_from_page(service, values, "standard", 30).eps == 16
        custom = _settings_from_page(service, values, "custom", 30)
        assert custom.eps == 30 and custom.robust == ("jpeg",) and custom.category is None
        assert custom.model == ("a/model", "./other-model") and custom.model_weight == (1, 3)
        assert custom.family == ("sd1", None) and custom.model_config == (None, None)
        assert custom.work_size is None  # the CLI's default, raised to the models' size
        with pytest.raises(ValueError, match="one value per model"):
            _settings_from_page(service, {**values, "family": "sd1"}, "light", 8)
        # an emptied number box, or a fraction where a whole number belongs, names the box
        with pytest.raises(ValueError, match="^Steps: enter a number.$"):
            _settings_from_page(service, {**values, "steps": None}, "light", 8)
        with pytest.raises(ValueError, match="^Seed: enter a whole number; got 2.5.$"):
            _settings_from_page(service, {**values, "seed": 2.5}, "light", 8)
    finally:
        service.close()


def test_output_names_stay_unique_and_etas_extrapolate(monkeypatch):
    assert _unique_names(["a.png", "a.jpg", "A.tif", "b.png"]) == [
        "a.png",
        "a-2.jpg",
        "A-3.tif",
        "b.png",
    ]
    clock = [100.0]
    monkeypatch.setattr("mimicshield.webapp.jobs.time.perf_counter", lambda: clock[0])
    progress = JobProgress()
    progress.start_run(4)
    progress.done_images = 1
    progress.start_image("b.png")
    clock[0] += 10
    progress.on_step(25, 100)
    assert progress.image_eta() == pytest.approx(30)  # 10 s for a quarter of the steps
    assert progress.overall_fraction == pytest.approx(1.25 / 4)
    assert progress.overall_eta() == pytest.approx(10 * (4 - 1.25) / 1.25)
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "–"


# --- the service with the tiny model ---------------------------------------------------------


def test_a_job_writes_what_the_cli_writes(service, tmp_path, tiny_model_dir, monkeypatch):
    art = _png(tmp_path / "art.png", seed=3)
    job = service.protect("tab-1", _uploads(service, art), service.defaults)

    [image] = job.protected
    # named so that a download is never taken for (or saved over) the original
    assert image.output.name == "art-protected.png" and image.linf_255 <= service.defaults.eps
    assert Image.open(image.output).size == (32, 24)
    assert image.before.is_file() and image.after.is_file() and image.perturbation.is_file()
    with zipfile.ZipFile(job.zip_path) as archive:
        assert sorted(archive.namelist()) == ["art-protected.png", "manifest.json"]
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["parameters"]["method"] == "sds-" and manifest["images"][0]["linf_255"] <= 16
    # the zip's manifest names the uploaded file, not the server's copy (whose path names the
    # session), and the output by the name it has in the zip
    [entry] = manifest["images"]
    assert entry["input"] == "art.png"
    assert entry["output"] == entry["relative"] == "art-protected.png"
    assert str(service.work_root) not in json.dumps(manifest)

    # The same options on the command line give the same bytes: same metadata, same pixels.
    out = tmp_path / "cli"
    args = ["protect", str(art), "-o", str(out), "--model", str(tiny_model_dir)]
    args += ["--device", "cpu", "--dtype", "fp32", "--steps", "1", "--work-size", "32"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert _sha256(out / "art.png") == _sha256(image.output)
    assert DMI_PROHIBITED_AIML in Image.open(image.output).text["XML:com.adobe.xmp"]

    # a JPEG is saved as PNG: the manifest's input and relative name the files in the zip
    photo = tmp_path / "photo.jpg"
    Image.open(art).convert("RGB").save(photo, quality=95)
    job = service.protect("tab-1", _uploads(service, photo), service.defaults)
    with zipfile.ZipFile(job.zip_path) as archive:
        [entry] = json.loads(archive.read("manifest.json"))["images"]
        assert entry["input"] == "photo.jpg"  # a JPEG is saved as PNG: both name that file
        assert entry["output"] == entry["relative"] == "photo-protected.png"
        assert "photo-protected.png" in archive.namelist()


def test_several_models_protect_as_an_ensemble(service, tmp_path, tiny_model_dir):
    settings = replace(service.defaults, model=f"{tiny_model_dir}\n{tiny_model_dir}")
    settings = replace(settings, model_weight=(1, 3))
    job = service.protect("tab-1", _uploads(service, _png(tmp_path / "a.png")), settings)
    manifest = json.loads((job.protected[0].output.parent / "manifest.json").read_text())
    assert manifest["model"] == [str(tiny_model_dir)] * 2
    assert manifest["model_weights"] == [0.25, 0.75] and manifest["family"] == ["sd1", "sd1"]


@pytest.fixture
def load_calls(monkeypatch) -> list[tuple[str, int]]:
    """The real ``load_models``, recording (source, clip skip) of every call."""
    from mimicshield import models

    real, calls = models.load_models, []

    def load_models(source, **kwargs):
        calls.append((source, kwargs["clip_skip"]))
        return real(source, **kwargs)

    monkeypatch.setattr(models, "load_models", load_models)
    return calls


def _at_layer(model, prompt: str, clip_skip: int):
    """The SD 1.x prompt embedding at ``clip_skip``, computed here from the encoder."""
    import torch

    tokens = model._tokens(model.tokenizer, prompt)
    with torch.no_grad():
        states = model.text_encoder(tokens, output_hidden_states=True).hidden_states
        return model.text_encoder.final_layer_norm(states[-clip_skip])


def test_another_clip_skip_reads_the_loaded_model_at_its_layer(service, tmp_path, load_calls):
    """Only the layer prompts are read from changes: the weights stay, and are not read again."""
    import torch

    from mimicshield.models import ModelLoadError

    source = service.defaults.model[0]
    [first] = service.models_for(service.defaults)
    deeper = replace(service.defaults, clip_skip=2)
    job = service.protect("tab", _uploads(service, _png(tmp_path / "a.png")), deeper)
    assert load_calls == [(source, 1)]
    [second] = service.models_for(deeper)
    assert second.clip_skip == 2 and second.unet is first.unet
    prompt = deeper.chosen_prompt
    at_2 = _at_layer(first, prompt, 2)
    torch.testing.assert_close(second.embed_prompt(prompt), at_2, rtol=0, atol=1e-6)
    assert not torch.allclose(second.embed_prompt(prompt), first.embed_prompt(prompt))
    manifest = json.loads((job.protected[0].output.parent / "manifest.json").read_text())
    assert manifest["parameters"]["clip_skip"] == 2
    # deeper than its two layers: the load's own one-line refusal, and the models stay
    with pytest.raises(ModelLoadError) as error:
        service.models_for(replace(service.defaults, clip_skip=4))
    assert str(error.value) == (
        f"{source}: clip skip 4 is deeper than its text_encoder (2 layers) goes; the most it "
        "takes is 3 (1 = the text encoder's last layer (the default), 2 = the penultimate, as "
        "model cards, A1111 and civitai count; diffusers' own clip_skip is one less)."
    )
    [back] = service.models_for(service.defaults)
    assert back.clip_skip == 1 and back.unet is first.unet and load_calls == [(source, 1)]


def _page_values(settings: ProtectSettings, clip_skip: str) -> dict:
    """The page's boxes showing ``settings``, with ``clip_skip`` typed in its box."""
    values = {name: getattr(settings, name) for name, _ in ADVANCED}
    values.update(model="\n".join(settings.model), model_weight="", model_config="", family="")
    values.update(category="none", robust=[], target=None, work_size=settings.work_size or "")
    return {**values, "clip_skip": clip_skip}


def test_an_ensembles_clip_skips_go_one_per_model_without_a_reload(service, load_calls):
    """The page's clip skip box: one value for every model, or one per model line in order."""
    import torch

    two = replace(service.defaults, model=service.defaults.model * 2, clip_skip=(2, 1))
    first, second = service.models_for(two)
    assert (first.clip_skip, second.clip_skip) == (2, 1)
    prompt = two.chosen_prompt
    torch.testing.assert_close(first.embed_prompt(prompt), _at_layer(first, prompt, 2))
    torch.testing.assert_close(second.embed_prompt(prompt), _at_layer(second, prompt, 1))
    swapped = service.models_for(replace(two, clip_skip=(1, 3)))
    assert [model.clip_skip for model in swapped] == [1, 3] and len(load_calls) == 2
    torch.testing.assert_close(swapped[1].embed_prompt(prompt), _at_layer(second, prompt, 3))
    settings = _settings_from_page(service, _page_values(two, "3, 2"), "standard", 16)
    assert settings.clip_skip == (3, 2)
    assert _settings_from_page(service, _page_values(two, "2"), "light", 8).clip_skip == (2, 2)
    with pytest.raises(ValueError, match=r"^Clip skip: give one value per model \(2\); got 3\.$"):
        _settings_from_page(service, _page_values(two, "1\n2\n3"), "standard", 16)
    assert "one per model line, or one for all" in dict(ADVANCED)["clip_skip"]


class HeldProgress(JobProgress):
    """Holds the job inside its step callback at the given steps until the test releases it:
    the test and the job thread meet at known points, with no sleeps."""

    def __init__(self, *steps: int) -> None:
        super().__init__()
        self.reached = {s: threading.Event() for s in steps}
        self.released = {s: threading.Event() for s in steps}

    def on_step(self, step: int, total: int) -> None:
        super().on_step(step, total)
        if step in self.reached:
            self.reached[step].set()
            if not self.released[step].wait(600):  # a hang guard only
                raise TimeoutError(f"the test never released step {step}")


def test_cancel_stops_a_job_at_its_next_step(service, tmp_path):
    art = _png(tmp_path / "art.png")
    settings = replace(service.defaults, steps=10)  # more than it may run
    progress = HeldProgress(2, 3)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            service.protect("tab-1", _uploads(service, art), settings, progress)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    service.arm("tab-1")
    worker.start()
    try:
        assert progress.reached[2].wait(600), f"the job never reached step 2: {outcome}"
        service.cancel("tab-2")  # another tab's Cancel does not touch this job:
        progress.released[2].set()  # step 2's cancel check runs after it, and the job goes on
        assert progress.reached[3].wait(600), f"the job stopped after step 2: {outcome}"
        service.cancel("tab-1")
        service.arm("tab-1")  # Protect pressed right after Cancel: the running job still stops
    except BaseException:
        service.cancel("tab-1")
        raise
    finally:
        for event in progress.released.values():
            event.set()
        worker.join(120)
    assert not worker.is_alive(), "the job did not stop"
    assert len(outcome) == 1 and isinstance(outcome[0], JobCancelled), outcome
    assert progress.step == 3  # stopped at the check right after the step it was in
    assert not list(service.session_folder("tab-1").rglob("protected/*.png"))
    # ... and the job that Protect queued is not cancelled by the Cancel before it
    assert not service.cancel_requested("tab-1")
    job = service.protect("tab-1", _uploads(service, art), service.defaults)
    assert not job.cancelled and len(job.protected) == 1


def test_jobs_of_several_tabs_run_one_at_a_time(service, tmp_path):
    art = _png(tmp_path / "art.png")
    spans: dict[object, list[float]] = {}
    real_run = service._run

    def timed_run(cancel, *args):  # keyed by the job's own cancel flag
        spans[cancel] = [time.monotonic()]
        real_run(cancel, *args)
        spans[cancel].append(time.monotonic())

    service._run = timed_run
    errors: list[BaseException] = []

    def protect(session: str) -> None:
        try:
            service.protect(session, _uploads(service, art), service.defaults)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=protect, args=(f"tab-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads) and not errors, errors
    (a_start, a_end), (b_start, b_end) = sorted(spans.values())
    assert a_end <= b_start, "two jobs ran at the same time"

    # In the page, protection and the check share one queue slot; Cancel skips the queue.
    demo = build_app(service)
    limits = {fn.name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values()}
    assert limits["run_protect"][1] == 1 and limits["run_check"][1] == 1
    assert limits["run_protect"][0] == limits["run_check"][0]
    assert limits["on_cancel"][1] is None


def test_temporary_files_go_with_the_tab_and_the_app(tmp_path, tiny_model_dir):
    service = ProtectionService(ProtectSettings(model=str(tiny_model_dir), **FAST))
    root = service.work_root
    assert root.is_dir() and root.name.startswith("mimicshield-ui-")
    # Gradio's cached copy of the upload: the user's original, removed with the tab
    cached = service.cache_dir / "d41d8c" / "a.png"
    cached.parent.mkdir(parents=True)
    _png(cached)
    outside = _png(tmp_path / "outside.png")  # a path outside the cache is never deleted
    service.remember_uploads("tab-1", [str(cached), str(outside)])
    job = service.protect("tab-1", _uploads(service, cached), service.defaults)
    assert job.folder.is_dir()
    service.end_session("tab-1")  # the tab was closed
    assert not service.session_folder("tab-1").exists()
    assert not cached.exists() and outside.exists()
    service.close()
    assert not root.exists()


def test_a_remote_page_cannot_choose_another_model(tmp_path, tiny_model_dir):
    settings = ProtectSettings(model=str(tiny_model_dir), **FAST)
    service = ProtectionService(settings, allow_model_choice=False, work_root=tmp_path / "w")
    other = ProtectSettings(model=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match=r"model is fixed .*\(here the model differs\)"):
        service.protect("tab", _uploads(service, _png(tmp_path / "a.png")), other)
    # the same model read another way is another model too, and the message says which part
    deeper = ProtectSettings(model=str(tiny_model_dir), clip_skip=2, **FAST)
    with pytest.raises(ValueError, match=r"\(here the clip skip differs\)"):
        service.protect("tab", _uploads(service, _png(tmp_path / "b.png")), deeper)
    service.close()


def test_the_command_binds_to_this_computer_unless_told(monkeypatch, tiny_model_dir):
    calls = []

    def fake_launch(service, **options):
        calls.append((service.allow_model_choice, options))
        service.close()

    monkeypatch.setattr("mimicshield.webapp.launch", fake_launch)
    runner = CliRunner(env={"COLUMNS": "300"})
    base = ["ui", "--model", str(tiny_model_dir), "--device", "cpu"]
    assert runner.invoke(cli_app, base).exit_code == 0
    exposed = runner.invoke(cli_app, [*base, "--host", "0.0.0.0", "--port", "8080"])
    assert exposed.exit_code == 0 and "reachable from other computers" in exposed.output
    (local_choice, local), (exposed_choice, remote) = calls
    assert local["host"] == "127.0.0.1" and local["share"] is False and local_choice
    assert remote["host"] == "0.0.0.0" and remote["port"] == 8080 and not exposed_choice


# --- the real app in headless Chromium -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(tmp_path, tiny_model_dir):
    """``mimicshield ui`` in a subprocess, on a free port, with small limits for the bad uploads."""
    port = _free_port()
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONUNBUFFERED"] = "1"  # the URL line must reach the log while the app runs
    command = [sys.executable, "-m", "mimicshield.cli.main", "ui", "--model", str(tiny_model_dir)]
    command += ["--device", "cpu", "--dtype", "fp32", "--port", str(port)]
    command += [
        "--max-megapixels",
        "0.3",
        "--max-file-mb",
        "0.6",
        "--lpips-weights",
        str(LPIPS_FILE),
    ]
    log = tmp_path / "server.log"
    with open(log, "w") as stream:
        server = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        if url in log.read_text():
            break
        time.sleep(0.5)
    else:
        server.terminate()  # not kill: SIGTERM lets it delete its temporary folder
        server.wait(30)
        pytest.fail(f"the app did not start:\n{log.read_text()}")
    try:
        yield url + "/", server, log
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


def _artifacts() -> Path:
    folder = Path(os.environ.get("MIMICSHIELD_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _upload(page, *paths: Path) -> None:
    page.set_input_files("#ms-upload input[type=file]", [str(p) for p in paths])


def _fast_options(page, steps: int) -> None:
    if not page.locator("#ms-steps").is_visible():
        page.get_by_text("Advanced: every command-line option").click()
    page.locator("#ms-steps input").fill(str(steps))
    page.locator("#ms-work-size textarea, #ms-work-size input").first.fill("32")


# Waits, not timing assertions: on a loaded 2-core machine (the suite beside other jobs) a step
# of the page took over 30 s, Playwright's default.
PAGE_WAIT_MS = 120_000


def _page(browser, **options):
    """A page of its own browser context, with waits that tolerate a loaded machine."""
    page = browser.new_context(viewport={"width": 1400, "height": 1400}, **options).new_page()
    page.set_default_timeout(PAGE_WAIT_MS)
    return page


@requires_assets
def test_the_app_in_headless_chromium(running_app, tmp_path):
    """Bad uploads, a bad option, three tabs sharing the queue, Cancel (running and queued),
    protect, download, check, screenshot."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    url, server, log = running_app
    artwork = IMAGES / "artwork" / "vangogh_sunflowers_1888.png"  # 512 x 512, 519 KB
    notes = tmp_path / "notes.png"
    notes.write_text("a text file with an image's name\n")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (600, 600), "white").save(huge)  # small file, 0.36 MP > 0.3 MP
    heavy = tmp_path / "heavy.png"
    _png(heavy, 500, 500)  # 0.25 MP, but 750 KB > 0.6 MB
    screenshot = _artifacts() / "webapp.png"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            first = _page(browser)
            first.goto(url, wait_until="load")
            first.wait_for_selector("#ms-protect")
            assert "device: cpu" in first.inner_text("#ms-device")

            # Bad uploads: a clear message each, in the page.
            _upload(first, notes, huge)
            first.wait_for_selector("#ms-upload-errors")
            errors = first.inner_text("#ms-upload-errors")
            assert "notes.png: not an image" in errors
            assert "huge.png: 600 × 600 pixels (0.36 MP) is more than this app's limit" in errors
            listed = first.inner_text("#ms-upload")  # refused files leave the list
            assert "notes" not in listed and "huge" not in listed
            _upload(first, heavy)  # refused by Gradio before it is stored
            first.get_by_text("exceed the maximum allowed size").first.wait_for()

            # A number below its box's minimum is named, in the progress box.
            _upload(first, artwork)
            first.wait_for_selector("#ms-upload-ok")
            _fast_options(first, 0)
            first.click("#ms-protect")
            first.locator("#ms-progress-box").get_by_text("Steps must be at least 1").wait_for()

            # Tab 1 starts a long job; tab 2 queues behind it; Cancel really stops tab 1's job.
            _fast_options(first, 100_000)
            first.click("#ms-protect")
            first.get_by_text(re.compile(r"step \d+/\d+ · ETA")).wait_for(timeout=60_000)
            assert "All images: 0/1 done · ETA" in first.inner_text("#ms-progress")

            page = _page(browser, accept_downloads=True)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#ms-protect")
            _upload(page, artwork)
            page.wait_for_selector("#ms-upload-ok")
            page.get_by_label("Light (ε = 8/255)").check()
            _fast_options(page, 2)
            page.click("#ms-protect")
            page.wait_for_selector("#ms-queued")

            # Tab 3 queues too, and cancels while it waits: told at once, not when tab 1 ends.
            third = _page(browser)
            third.goto(url, wait_until="load")
            third.wait_for_selector("#ms-protect")
            _upload(third, artwork)
            third.wait_for_selector("#ms-upload-ok")
            third.click("#ms-protect")
            third.wait_for_selector("#ms-queued")
            third.click("#ms-cancel")
            assert "your job will not run" in third.inner_text("#ms-cancelled")
            third.context.close()  # its upload is tab 1's and tab 2's too: it stays

            first.click("#ms-cancel")
            # a wait, not a timing check: under load the stop has taken longer than 30 s
            first.get_by_text("Cancelled: the job stopped").wait_for(timeout=120_000)

            # Tab 2's job runs next.
            page.wait_for_selector("#ms-done", timeout=60_000)
            assert "Done: 1 protected" in page.inner_text("#ms-done")
            with page.expect_download() as download:
                page.locator("#ms-downloads a").first.click()
            # not the original's name: the download must not be saved over the original
            assert download.value.suggested_filename == "vangogh_sunflowers_1888-protected.png"
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            with page.expect_download() as download:
                page.click("#ms-zip")
            archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))

            page.click("#ms-check")
            page.wait_for_selector("#ms-check-result", timeout=90_000)
            check = page.inner_text("#ms-check-result")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot of the web app: {screenshot}")

    clean = np.asarray(Image.open(artwork).convert("RGB"), dtype=np.int16)
    with Image.open(saved) as protected:
        assert protected.size == (512, 512)
        assert DMI_PROHIBITED_AIML in protected.text["XML:com.adobe.xmp"]
        pixels = np.asarray(protected.convert("RGB"), dtype=np.int16)
    assert 0 < np.abs(pixels - clean).max() <= 8  # the Light preset
    assert sorted(archive.namelist()) == ["manifest.json", "vangogh_sunflowers_1888-protected.png"]
    assert json.loads(archive.read("manifest.json"))["parameters"]["eps"] == pytest.approx(8 / 255)
    assert "mimicry of the protected image: 0." in check and "strength 0.3" in check

    # Results and previews are served from the job's folder, never copied into Gradio's
    # cache, so a closed tab's folder takes them all with it.
    work_root = Path(re.search(r"Temporary files: (\S+)", log.read_text())[1])
    assert work_root.is_dir()
    cache, sessions = work_root / "uploads", work_root / "uploads" / "sessions"
    copied = {p.name for p in cache.rglob("*") if p.is_file() and sessions not in p.parents}
    ours = {"before.png", "after.png", "perturbation.png", "sdedit-clean.png", webapp.ZIP_NAME}
    assert not copied & ours, copied
    # Stopping the app removes its temporary files (uploads, jobs, Gradio's cache).
    server.terminate()
    server.wait(30)
    assert not work_root.exists()


def test_a_failed_image_is_reported_under_the_name_it_was_uploaded_as(service, tmp_path):
    rgba = tmp_path / "logo.png"
    Image.fromarray(noise(24, 32, seed=5)).convert("RGBA").save(rgba)
    settings = replace(service.defaults, file_format="jpeg")  # JPEG cannot keep the alpha
    job = service.protect("tab-1", _uploads(service, rgba), settings)
    [image] = job.images
    assert image.status == "failed" and image.error.startswith("logo.png: ")
    assert str(service.work_root) not in image.error


def test_checking_results_that_were_swept_away_says_so(service, tmp_path):
    job = service.protect("tab-1", _uploads(service, _png(tmp_path / "a.png")), service.defaults)
    shutil.rmtree(job.folder)  # what the sweep of folders older than two hours does
    with pytest.raises(ValueError, match="expired.*protect the images again"):
        service.check("tab-1", job, "a.png")


def test_a_mistyped_model_fails_when_the_app_starts(tmp_path, monkeypatch):
    from mimicshield.models import ModelLoadError

    monkeypatch.setattr("mimicshield.webapp.launch", lambda *a, **k: pytest.fail("launched"))
    result = CliRunner().invoke(cli_app, ["ui", "--model", str(tmp_path / "nope")])
    assert isinstance(result.exception, ModelLoadError)
    assert "no such model folder" in str(result.exception)


def test_a_port_in_use_says_to_choose_another_with_port(tmp_path):
    from mimicshield.webapp import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = ProtectionService(work_root=tmp_path / "w")
        with pytest.raises(OSError, match=f"port {port}.*with --port") as error:
            # no preload: were the port free after all, it would fetch the default hub model
            launch(service, port=port, block=False, quiet=True, preload=False)
    assert "GRADIO_SERVER_PORT" not in str(error.value)


@pytest.mark.parametrize("port", ["0", "-1", "99999"])
def test_a_port_out_of_range_is_one_line_before_anything_starts(port):
    result = CliRunner().invoke(cli_app, ["ui", "--port", port])
    assert result.exit_code != 0
    assert "1 to 65535" in f"{result.output} {result.exception}"


def test_the_apps_pixel_limit_is_the_one_that_refuses(monkeypatch):
    """Pillow's own bomb check (twice MAX_IMAGE_PIXELS) would refuse a 225 MP image that a
    `--max-megapixels 300` app allows; the limit is raised to the app's, never lowered."""
    from PIL import Image

    from mimicshield.cli.ui import allow_pillow_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default
    allow_pillow_pixels(300_000_000)
    assert 2 * Image.MAX_IMAGE_PIXELS >= 300_000_000
    allow_pillow_pixels(10_000_000)
    assert 2 * Image.MAX_IMAGE_PIXELS >= 300_000_000  # not lowered
