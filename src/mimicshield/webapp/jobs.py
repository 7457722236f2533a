"""What a job is and how far it got: the records the service writes and the page reads.

:class:`JobProgress` is written by the job's thread and read by the page every half second;
:class:`Job`, :class:`ImageResult` and :class:`CheckResult` are what a finished job or check
leaves behind. The preview pictures are made here too, from preview-size copies.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images import load_image
from .settings import ProtectSettings

PREVIEW_SIZE = 1024  # longest side of the pictures shown in the page


class JobCancelled(Exception):
    """Raised inside a job at its next step once the user pressed Cancel.

    Deliberately not a RuntimeError: the runner records those as one failed image and goes
    on, and Cancel must stop the whole job.
    """


# --- progress --------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@dataclass
class JobProgress:
    """Where a job stands, written by the worker thread and read by the page every half second.

    ETAs are linear extrapolations: per image from its own steps so far, overall from the
    fraction of all images done (finished images plus the current one's share).
    """

    phase: str = "Starting"
    total_images: int = 0
    done_images: int = 0
    current: str = ""
    batch: int = 1
    step: int = 0
    total_steps: int = 0
    image_started: float | None = None
    run_started: float | None = None
    cancel_requested: bool = False
    saving: bool = False  # the steps are done; the file is being written and measured

    def start_run(self, total_images: int) -> None:
        self.total_images, self.done_images = total_images, 0
        self.run_started = time.perf_counter()

    def start_image(self, name: str, batch: int = 1) -> None:
        self.current, self.batch, self.step = name, batch, 0
        self.image_started = time.perf_counter()
        self.saving = False

    def on_step(self, step: int, total: int) -> None:
        self.step, self.total_steps = step, total

    def start_saving(self) -> None:
        """After the last step, the output is written and measured (PSNR, SSIM): a minute or
        more for a large photo on the CPU, which must not look like a frozen "step N/N"."""
        self.saving = True

    @property
    def image_fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def overall_fraction(self) -> float:
        if not self.total_images:
            return 0.0
        done = self.done_images + min(self.batch * self.image_fraction, self.batch)
        return min(done / self.total_images, 1.0)

    def image_eta(self) -> float | None:
        return _eta(self.image_started, self.image_fraction)

    def overall_eta(self) -> float | None:
        return _eta(self.run_started, self.overall_fraction)


def _eta(started: float | None, fraction: float) -> float | None:
    if started is None or fraction <= 0:
        return None
    elapsed = time.perf_counter() - started
    return elapsed * (1 - fraction) / fraction


# --- results ---------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """One image of a job, with the pictures the page shows for it."""

    name: str
    input: Path
    output: Path | None = None
    status: str = "pending"
    error: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    linf_255: float | None = None
    seconds: float | None = None
    note: str | None = None
    before: Path | None = None
    after: Path | None = None
    perturbation: Path | None = None
    uploaded_as: str = ""  # the file name the user uploaded (``name`` is made unique)


@dataclass
class Job:
    """A finished (or cancelled) protection job; kept per browser tab for previews and checks."""

    id: str
    folder: Path
    settings: ProtectSettings
    images: list[ImageResult] = field(default_factory=list)
    zip_path: Path | None = None
    cancelled: bool = False
    seconds: float = 0.0
    device: str = ""

    @property
    def protected(self) -> list[ImageResult]:
        return [image for image in self.images if image.status == "protected"]

    def image(self, name: str | None) -> ImageResult | None:
        return next((image for image in self.protected if image.name == name), None)


@dataclass
class CheckResult:
    """SDEdit at strength 0.3, same seed, on the clean and the protected image."""

    clean_mimicry: Path
    protected_mimicry: Path
    resolution: int
    lpips_clean: float | None = None  # LPIPS(mimicry of clean, clean image)
    lpips_protected: float | None = None  # LPIPS(mimicry of protected, clean image)
    lpips_between: float | None = None  # LPIPS(mimicry of protected, mimicry of clean)
    lpips_note: str | None = None


def _shrink(image: Tensor, mode: str) -> Tensor:
    """(3, H, W) -> at most ``PREVIEW_SIZE`` on its longest side."""
    height, width = image.shape[-2:]
    scale = PREVIEW_SIZE / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode=mode)[0]


def _preview_copies(path: Path) -> tuple[Tensor, Tensor]:
    """An image file at preview size, averaged ("area", to look at) and sampled ("nearest",
    every value a real pixel, so that a perturbation is not averaged away to grey). Only one
    full-size image is in memory at a time: a 50-megapixel one takes 600 MB as floats."""
    full = load_image(path).rgb
    return _shrink(full, "area"), _shrink(full, "nearest")


def _save_preview(image: Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1], at most ``PREVIEW_SIZE`` a side -> an 8-bit PNG."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def amplify(protected: Tensor, clean: Tensor, eps: float) -> Tensor:
    """The perturbation made visible: grey is unchanged, black and white are -eps and +eps."""
    return (0.5 + (protected - clean) / (2 * eps)).clamp(0, 1)
