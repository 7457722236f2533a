"""Big images in ``mimicshield ui`` (and ``protect``): memory bounded while saving and measuring,
previews from small copies, and a page that says what the job does after its last step.

A 49-megapixel photo made the server peak at 21.7 GB, most of it in SSIM (torchmetrics holds
about 35 copies of the image), then PSNR (float64 copies). The metrics now work in strips and
chunks of bounded size; these tests pin that bound, and that they give the whole image's values.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from image_cases import noise
from PIL import Image

pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[ui]')")

from mimicshield import metrics  # noqa: E402
from mimicshield.images import load_image  # noqa: E402
from mimicshield.webapp import (  # noqa: E402
    JobCancelled,
    JobProgress,
    amplify,
    render_progress,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def service(web_service):
    return web_service


def _pair(height: int, width: int, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    clean = torch.rand(count, 3, height, width, generator=generator)
    shift = 0.05 * torch.randn(clean.shape, generator=generator)
    return clean, (clean + shift).clamp(0, 1)


def test_ssim_psnr_and_linf_in_strips_are_the_whole_image_values(monkeypatch):
    clean, protected = _pair(157, 61)
    whole_ssim, whole_psnr = metrics.ssim(clean, protected), metrics.psnr(clean, protected)
    whole_linf = (clean - protected).abs().flatten(1).amax(1) * 255
    strips: list[torch.Size] = []
    real = metrics._ssim_inside

    def recorded(a, b):
        strips.append(a.shape)
        return real(a, b)

    monkeypatch.setattr(metrics, "_ssim_inside", recorded)
    monkeypatch.setattr(metrics, "METRIC_CHUNK", 2 * 3 * 61 * 9)  # 9 window rows a strip

    torch.testing.assert_close(metrics.ssim(clean, protected), whole_ssim, rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics.psnr(clean, protected), whole_psnr, rtol=0, atol=1e-9)
    assert torch.equal(metrics.linf_255(clean, protected), whole_linf)
    # 147 rows of windows in strips of 9 (the last one of 3), each with the window's margin
    assert len(strips) == 17
    assert all(shape[-2] <= 9 + metrics.SSIM_WINDOW - 1 for shape in strips)
    assert sum(shape[-2] - (metrics.SSIM_WINDOW - 1) for shape in strips) == 157 - 10


def test_ssim_strips_of_a_50_megapixel_photo_stay_small():
    """The strip a 7000 x 7000 photo is measured in: a few hundred MB for torchmetrics, not
    the 20 GB of the whole image (about 35 float32 copies of what it is given)."""
    width = 7000
    rows = metrics.METRIC_CHUNK // (3 * width) + metrics.SSIM_WINDOW - 1
    strip_bytes = 3 * rows * width * 4
    assert 35 * strip_bytes < 512 * 2**20
    assert rows < 7000 / 20  # and still few strips for the margin each one repeats


def test_previews_come_from_small_copies_and_keep_the_perturbation(service, tmp_path, monkeypatch):
    monkeypatch.setattr("mimicshield.webapp.jobs.PREVIEW_SIZE", 16)
    art = tmp_path / "art.png"
    Image.fromarray(noise(40, 64, seed=2)).save(art)
    accepted, _ = service.validate([art])
    job = service.protect("tab", accepted, replace(service.defaults, eps=8))
    [image] = job.protected
    clean, protected = load_image(image.input).rgb, load_image(image.output).rgb
    # what the page showed before: the whole perturbation amplified, then sampled down
    whole = amplify(protected, clean, 8 / 255)
    expected = torch.nn.functional.interpolate(whole[None], size=(10, 16), mode="nearest")[0]
    expected = (expected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with Image.open(image.perturbation) as shown:
        assert shown.size == (16, 10)
        np.testing.assert_array_equal(np.asarray(shown), expected)
    for preview in (image.before, image.after):
        with Image.open(preview) as shown:
            assert shown.size == (16, 10)


class HeldAtLastStep(JobProgress):
    """Holds the job at its last step until the test releases it, and records what the page
    would show once the steps are done."""

    def __init__(self) -> None:
        super().__init__()
        self.reached, self.released = threading.Event(), threading.Event()
        self.shown_while_saving: list[str] = []

    def on_step(self, step: int, total: int) -> None:
        super().on_step(step, total)
        if step == total and not self.released.is_set():
            self.reached.set()
            if not self.released.wait(600):  # a hang guard only
                raise TimeoutError("the test never released the last step")

    def start_saving(self) -> None:
        super().start_saving()
        self.shown_while_saving.append(render_progress(self))
        self.cancel_requested = True
        self.shown_while_saving.append(render_progress(self))
        self.cancel_requested = False


def test_after_the_last_step_the_page_says_saving_and_measuring(service, tmp_path):
    art = tmp_path / "art.png"
    Image.fromarray(noise(24, 32, seed=1)).save(art)
    accepted, _ = service.validate([art])
    progress = HeldAtLastStep()
    progress.released.set()  # not held: run through
    job = service.protect("tab", accepted, replace(service.defaults, steps=2), progress)
    assert job.protected
    shown, cancelling = progress.shown_while_saving
    assert "<b>Saving and measuring</b>" in shown
    # not a frozen "step 2/2 · ETA 0:00" for as long as a big photo takes to save
    assert "This image: art.png · saving the file and measuring PSNR and SSIM</div>" in shown
    assert "Cancelling: stopping once this image is saved…" in cancelling


def test_cancel_during_the_last_step_stops_before_the_file_is_saved(service, tmp_path):
    art = tmp_path / "art.png"
    Image.fromarray(noise(24, 32, seed=1)).save(art)
    accepted, _ = service.validate([art])
    progress = HeldAtLastStep()
    outcome: list = []

    def run() -> None:
        try:
            service.protect("tab", accepted, replace(service.defaults, steps=2), progress)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    service.arm("tab")
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert progress.reached.wait(600), f"the job never reached its last step: {outcome}"
        service.cancel("tab")
    finally:
        progress.released.set()
        worker.join(120)
    assert len(outcome) == 1 and isinstance(outcome[0], JobCancelled), outcome
    assert not progress.shown_while_saving  # it never went on to save
    assert not list(service.session_folder("tab").rglob("*-protected.png"))
