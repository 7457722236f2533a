"""``mimicshield ui`` jobs: Cancel while loading or queued, the page's own error messages,
earlier results kept until new ones exist, download names, and how a job's end is worded."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from image_cases import noise
from PIL import Image
from web_cases import FAST

pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[ui]')")

from mimicshield import webapp  # noqa: E402
from mimicshield.images import ImageFileError  # noqa: E402
from mimicshield.webapp import (  # noqa: E402
    ImageResult,
    Job,
    JobCancelled,
    JobProgress,
    ProtectionService,
    ProtectSettings,
    build_app,
    job_summary,
    lpips_unavailable,
    render_progress,
    robust_choices,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeRequest:
    def __init__(self, session_hash: str) -> None:
        self.session_hash = session_hash


@pytest.fixture
def service(web_service):
    yield web_service
    # a load a test abandoned (Cancel during it) finishes before the next test, and before
    # the interpreter exits: torch aborts the process when a thread is still inside it
    loader = web_service._loader
    if loader is not None:
        loader.join(300)


def _png(path: Path, seed: int = 0) -> Path:
    Image.fromarray(noise(24, 32, seed=seed)).save(path)
    return path


def _uploads(service: ProtectionService, *paths: Path):
    accepted, problems = service.validate(paths)
    assert not problems, problems
    return accepted


def _handlers(demo) -> dict:
    return {fn.name: fn for fn in demo.fns.values()}


def _by_id(blocks, elem_id: str):
    return next(block for block in blocks if getattr(block, "elem_id", None) == elem_id)


def _run_in_thread(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --- Cancel ------------------------------------------------------------------------------------


def test_cancel_during_a_model_load_stops_the_job_without_waiting_for_it(service, tmp_path):
    loading, release = threading.Event(), threading.Event()

    def slow_load(settings):  # a first load: importing diffusers, reading weights
        loading.set()
        release.wait(600)
        return []

    service.models_for = slow_load
    art = _png(tmp_path / "art.png")
    progress = JobProgress()
    service.arm("tab")
    worker, outcome = _run_in_thread(
        lambda: service.protect("tab", _uploads(service, art), service.defaults, progress)
    )
    try:
        assert loading.wait(120), "the load never started"
        service.cancel("tab")
        worker.join(120)  # returns while the load is still held: Cancel did not wait for it
        assert not worker.is_alive() and not release.is_set()
        assert len(outcome) == 1 and isinstance(outcome[0], JobCancelled), outcome
    finally:
        release.set()
    # no step has run: the page says "Cancelling…", not "at the next step"
    progress.cancel_requested = True
    text = render_progress(progress)
    assert "Cancelling…" in text and "step" not in text


WAITING_FOR_LOAD = "Waiting for the previous model load to finish"


def _slow_first_load(monkeypatch) -> tuple[threading.Event, threading.Event, list]:
    """The real ``load_models``, whose first call waits until released (a slow first load:
    importing diffusers, reading weights, a hub download). Returns (its first call started,
    the release, the sources of every call)."""
    from mimicshield import models

    real, started, release, calls = models.load_models, threading.Event(), threading.Event(), []

    def load_models(source, *args, **kwargs):
        calls.append(source)
        if len(calls) == 1:
            started.set()
            release.wait(600)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(models, "load_models", load_models)
    return started, release, calls


def _cancelled_during_its_load(service, art: Path, started: threading.Event, settings=None) -> None:
    """A job of tab-1 cancelled while it loads its model (the default one unless ``settings``
    say otherwise): its load goes on, abandoned."""
    settings = settings or service.defaults
    job, outcome = _run_in_thread(
        lambda: service.protect("tab-1", _uploads(service, art), settings)
    )
    assert started.wait(120), "the load never started"
    service.cancel("tab-1")
    job.join(120)
    assert outcome and isinstance(outcome[0], JobCancelled), outcome
    assert not service.busy  # the app is free again, with the load still running


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _other_models(service):
    """Settings whose models differ from the default ones: the family given rather than
    detected (another clip skip would reuse the loaded weights)."""
    return dataclasses.replace(service.defaults, family="sd1")


def _job_behind_a_cancelled_load_of_other_models(service, art: Path, started):
    """tab-2's job of the default models, started while tab-1's cancelled load of other models
    still runs; returned once it says it waits for that load (or has ended)."""
    _cancelled_during_its_load(service, art, started, _other_models(service))
    progress = JobProgress()
    job, outcome = _run_in_thread(
        lambda: service.protect("tab-2", _uploads(service, art), service.defaults, progress)
    )
    _wait_for(lambda: progress.phase == WAITING_FOR_LOAD or not job.is_alive())
    return job, outcome, progress


def test_a_job_after_a_cancelled_load_of_other_models_says_it_waits_for_it(
    service, tmp_path, monkeypatch
):
    """The abandoned load held the models while the next job said "Loading" and waited on
    it silently; now it says what it waits for, then loads its own."""
    started, release, calls = _slow_first_load(monkeypatch)
    art = _png(tmp_path / "art.png")
    try:
        job, outcome, progress = _job_behind_a_cancelled_load_of_other_models(service, art, started)
        assert progress.phase == WAITING_FOR_LOAD and WAITING_FOR_LOAD in render_progress(progress)
    finally:
        release.set()
    job.join(300)
    assert outcome and isinstance(outcome[0], Job) and outcome[0].protected, outcome
    assert len(calls) == 2  # the abandoned load's models were other ones: its own load


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_a_job_after_a_cancelled_load_of_its_models_uses_that_load(
    service, tmp_path, monkeypatch, clip_skip
):
    """The load still running (a cancelled job's, or the preload) is of this job's models (at
    any clip skip: the same weights): it is this job's load, shown as such, and its models are
    used rather than loaded again."""
    started, release, calls = _slow_first_load(monkeypatch)
    art = _png(tmp_path / "art.png")
    phases = []
    cancelled = dataclasses.replace(service.defaults, clip_skip=clip_skip)
    try:
        _cancelled_during_its_load(service, art, started, cancelled)
        progress = JobProgress()
        job, outcome = _run_in_thread(
            lambda: service.protect("tab-2", _uploads(service, art), service.defaults, progress)
        )
        _wait_for(lambda: progress.phase or not job.is_alive())
        phases.append(progress.phase)
    finally:
        release.set()
    job.join(300)
    assert phases[0] and phases[0] != WAITING_FOR_LOAD
    assert outcome and isinstance(outcome[0], Job) and outcome[0].protected, outcome
    assert len(calls) == 1  # the same models: the abandoned load's result, not a second load
    manifest = outcome[0].protected[0].output.parent / "manifest.json"
    assert json.loads(manifest.read_text())["parameters"]["clip_skip"] == 1  # this job's


def test_cancel_of_a_job_waiting_for_a_cancelled_load_answers_at_once(
    service, tmp_path, monkeypatch
):
    started, release, calls = _slow_first_load(monkeypatch)
    art = _png(tmp_path / "art.png")
    try:
        job, outcome, progress = _job_behind_a_cancelled_load_of_other_models(service, art, started)
        assert progress.phase == WAITING_FOR_LOAD, progress.phase
        cancelled = time.monotonic()
        service.cancel("tab-2")
        job.join(120)
        # polled every 0.2 s; the bound leaves room for a loaded machine, not for the load
        assert time.monotonic() - cancelled < 3 and not release.is_set()
        assert outcome and isinstance(outcome[0], JobCancelled), outcome
        assert calls == [str(service.defaults.model[0])]  # it started no load of its own
    finally:
        release.set()


def test_cancelling_says_what_it_waits_for():
    progress = JobProgress(cancel_requested=True)
    assert "<b>Cancelling…</b>" in render_progress(progress)  # queued or loading
    progress.start_run(2)
    progress.start_image("a.png")
    assert "<b>Cancelling…</b>" in render_progress(progress)  # reading the image: no step yet
    progress.on_step(3, 10)
    assert "Cancelling: stopping when this step ends…" in render_progress(progress)
    progress.start_saving()
    assert "Cancelling: stopping once this image is saved…" in render_progress(progress)


@pytest.mark.parametrize("preload", [True, False])
def test_the_app_loads_its_model_while_the_page_opens(service, preload):
    """Unless told not to: ``launch(preload=False)`` leaves the first load to the first job."""
    loaded = threading.Event()
    service.models_for = lambda settings: loaded.set() or []
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    running = webapp.launch(service, port=port, block=False, quiet=True, preload=preload)
    try:
        if preload:
            assert loaded.wait(120), "the default model was not preloaded"
        else:  # the preload starts its thread before launch returns: there would be one now
            assert service._loader is None and not loaded.is_set()
    finally:
        running.close()


def test_cancel_of_a_job_waiting_in_the_queue_answers_at_once(service):
    on_cancel = _handlers(build_app(service))["on_cancel"]
    service.arm("tab-2")  # pressed Protect; waits behind another tab's job
    answer = on_cancel.fn(FakeRequest("tab-2"))
    assert "Cancelled: your job will not run." in answer and 'id="ms-cancelled"' in answer
    assert service.cancel_requested("tab-2")  # ... and it will not run
    assert on_cancel.fn(FakeRequest("tab-2")) == {"__type__": "update"}  # said once is enough
    assert on_cancel.fn(FakeRequest("idle-tab")) == {"__type__": "update"}  # nothing waits
    progress_box = _by_id(on_cancel.outputs, "ms-progress-box")
    assert progress_box is not None

    service.arm("tab-1")
    cancel = service._start_job("tab-1")  # a running job: its progress says "Cancelling"
    try:
        assert on_cancel.fn(FakeRequest("tab-1")) == {"__type__": "update"}
        assert cancel.is_set()
    finally:
        service._leave("tab-1", cancel)


def test_a_run_that_never_started_a_job_leaves_no_waiting_job_behind(service):
    """Protect with no images ends before any job starts; a later Cancel must not answer that
    a job is waiting ("your job will not run")."""
    handlers = _handlers(build_app(service))
    protect, on_cancel = handlers["run_protect"], handlers["on_cancel"]
    service.arm("tab-3")
    updates = list(protect.fn(_page_data(protect), FakeRequest("tab-3")))
    assert "Add one or more images" in str(updates[-1])
    assert on_cancel.fn(FakeRequest("tab-3")) == {"__type__": "update"}


# --- the page's messages -------------------------------------------------------------------


def _page_data(protect_fn, **values) -> dict:
    """The page's initial values, as Gradio hands them to ``run_protect``, by elem_id."""
    data = {component: getattr(component, "value", None) for component in protect_fn.inputs}
    for elem_id, value in values.items():
        data[_by_id(protect_fn.inputs, elem_id)] = value
    return data


@pytest.mark.parametrize(
    ("box", "value", "message"),
    [
        ("ms-steps", 0, "Steps must be at least 1; got 0."),
        ("ms-tile-size", 10, "The tile size must be at least 64; got 10."),
        ("ms-batch-size", -1, "The batch size must be at least 0"),
    ],
)
def test_a_number_below_its_minimum_is_named_in_the_progress_box(
    service, tmp_path, box, value, message
):
    demo = build_app(service)
    handlers = _handlers(demo)
    protect = handlers["run_protect"]
    # Gradio's own bound check would refuse the value before run_protect with an unnamed
    # "Value 0 is less than minimum value 1." and leave "Starting…" in the progress box.
    assert _by_id(protect.inputs, box).minimum is None
    data = _page_data(protect, **{"ms-upload": [str(_png(tmp_path / "a.png"))], box: value})

    [update] = list(protect.fn(data, FakeRequest("tab")))

    progress_box = _by_id(protect.outputs, "ms-progress-box")
    assert message in update[progress_box]
    assert list(update) == [progress_box]  # the earlier results stay on the page
    # anything Gradio refuses before the job runs is said in the progress box too
    failure = next(fn for fn in demo.fns.values() if fn.trigger_only_on_failure)
    assert progress_box in failure.outputs and "Not started" in failure.fn()


def test_the_end_of_a_job_says_how_it_went():
    def job(*statuses: str, cancelled: bool = False) -> Job:
        images = [
            ImageResult(f"{n}.png", Path(f"{n}.png"), status=status, error=f"{n}.png: broken")
            for n, status in enumerate(statuses)
        ]
        for image in images:
            image.error = image.error if image.status == "failed" else None
        return Job("id", Path("job"), ProtectSettings(), images, cancelled=cancelled, seconds=47)

    lines, kind = job_summary(job("protected", "protected"))
    assert lines == ["Done: 2 protected in 0:47."] and kind == "ok"
    lines, kind = job_summary(job("failed", "failed"))
    assert lines[0] == "Failed: none of the 2 image(s) could be protected." and kind == "error"
    assert lines[1:] == ["0.png: broken", "1.png: broken"]
    lines, kind = job_summary(job("protected", "failed"))
    assert lines[0] == "Finished with errors: 1 protected, 1 failed (0:47)." and kind == "warning"
    lines, kind = job_summary(job("protected", "cancelled", cancelled=True))
    assert lines[0].startswith("Cancelled: 1 image(s) were protected before you cancelled (0:47)")
    assert "kept in" not in lines[0] and kind == "warning"


def test_the_check_says_how_to_get_lpips_in_words_for_the_page(tmp_path, tiny_model_dir):
    offline = FileNotFoundError(
        "No LPIPS weights: pass --lpips-weights PATH or set MIMICSHIELD_LPIPS_WEIGHTS "
        "(HF_HUB_OFFLINE is set, so they are not downloaded)."
    )
    text = lpips_unavailable(offline)
    assert "pass --lpips-weights PATH" not in text and "downloads are switched off" in text

    settings = ProtectSettings(model=str(tiny_model_dir), **FAST)
    missing = tmp_path / "lpips_alexnet.safetensors"
    service = ProtectionService(settings, work_root=tmp_path / "work", lpips_weights=missing)
    try:
        job = service.protect("tab", _uploads(service, _png(tmp_path / "a.png")), settings)
        result = service.check("tab", job, "a.png")
    finally:
        service.close()
    assert result.lpips_clean is None and result.clean_mimicry.name == "sdedit-clean.png"
    assert result.lpips_note.startswith(
        "LPIPS scores unavailable: the LPIPS weights file this app was given does not exist."
    )
    assert (
        "start the app with the weights file: mimicshield ui --lpips-weights" in result.lpips_note
    )
    assert str(missing) not in result.lpips_note  # a server path means nothing in the page


def test_the_robust_choices_say_what_none_means():
    labels = dict((value, label) for label, value in robust_choices())
    assert set(labels) == {"jpeg", "resize", "blur", "noise", "none"}
    assert labels["none"] != "none" and "unchanged image" in labels["none"]
    assert "none ticked: no hardening" in webapp.LABELS["robust"]


# --- results -----------------------------------------------------------------------------------


def test_protecting_again_keeps_the_earlier_results_until_there_are_new_ones(service, tmp_path):
    art = _png(tmp_path / "art.png")
    first = service.protect("tab", _uploads(service, art), service.defaults)
    kept = [first.protected[0].output, first.zip_path, first.protected[0].before]

    service.arm("tab")
    service.cancel("tab")  # cancelled before it protected anything
    with pytest.raises(JobCancelled):
        service.protect("tab", _uploads(service, art), service.defaults)
    rgba = tmp_path / "logo.png"
    Image.fromarray(noise(24, 32, seed=5)).convert("RGBA").save(rgba)
    failed = service.protect(  # every image fails: JPEG cannot keep the alpha
        "tab", _uploads(service, rgba), replace(service.defaults, file_format="jpeg")
    )
    assert not failed.protected and not failed.folder.exists()
    assert all(path.is_file() for path in kept)
    assert [p.name for p in service.session_folder("tab").iterdir()] == [first.folder.name]

    second = service.protect("tab", _uploads(service, art), service.defaults)
    assert not first.folder.exists() and second.protected[0].output.is_file()
    assert [p.name for p in service.session_folder("tab").iterdir()] == [second.folder.name]


@pytest.mark.parametrize("where", ["before the GPU", "after the images"])
def test_a_job_that_raises_cleans_up_like_one_that_protected_nothing(
    service, tmp_path, monkeypatch, where
):
    """protect has one way out: raised before it takes the GPU (a target gone from disk) or
    after its images were protected (no room for the zip), it leaves the tab's earlier results
    and no folder of its own, the GPU free and no job of the tab running."""
    art = _png(tmp_path / "art.png")
    first = service.protect("tab", _uploads(service, art), service.defaults)
    settings, expected = service.defaults, OSError
    if where == "before the GPU":
        settings = replace(settings, method="mist", target=str(tmp_path / "gone.png"))
        expected = ImageFileError
    else:

        def no_room(*_):
            raise OSError("No space left on device")

        monkeypatch.setattr(service, "_zip", no_room)
    with pytest.raises(expected):
        service.protect("tab", _uploads(service, art), settings)
    assert [p.name for p in service.session_folder("tab").iterdir()] == [first.folder.name]
    assert first.zip_path.is_file() and first.protected[0].output.is_file()
    assert not service.busy and not service._gpu.locked() and not service._is_running("tab")


def test_downloads_are_named_as_protected_copies(service, tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(noise(24, 32, seed=1)).save(photo, quality=95)
    art, twin = _png(tmp_path / "art.png", 2), tmp_path / "twin"
    twin.mkdir()
    other = _png(twin / "art.png", 3)  # another picture with the same name
    job = service.protect("tab", _uploads(service, photo, art, other), service.defaults)
    assert [i.output.name for i in job.protected] == [
        "photo-protected.png",
        "art-protected.png",
        "art-2-protected.png",
    ]
    assert [i.name for i in job.protected] == ["photo.jpg", "art.png", "art-2.png"]
