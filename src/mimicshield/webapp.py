"""``mimicshield ui``: a local web app, for the artists and photographers who do not use terminals.

Why Gradio: it is what the ML ecosystem ships demos and local tools with (Mist's WebUI too), it
gives drag-and-drop uploads, downloads and a job queue shared by all browser tabs out of the box,
and it runs from ``pip install`` with no Node toolchain. Its queue matters most here: several
tabs must wait for the one GPU, not fight over it.

The module has two halves:

- :class:`ProtectionService` knows nothing about Gradio. It validates uploads, keeps one model
  (or ensemble) loaded, runs one job at a time through the CLI's own
  :func:`~mimicshield.runner.protect_files` (so outputs carry the same metadata and
  ``manifest.json``), reports progress, stops at the next step when cancelled, runs the SDEdit
  check, and owns every temporary file.
- :func:`build_app` lays out the page and wires its events to the service; :func:`launch` serves
  it on 127.0.0.1 unless told otherwise.
"""

# No `from __future__ import annotations`: Gradio reads the `gr.Request` annotations of the
# event handlers at runtime to inject the request, and string annotations hide them.
import contextlib
import html
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .defaults import DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_TILE_SIZE, DEFAULT_WORK_SIZE
from .images import IMAGE_SUFFIXES, ImageFileError, load_image, probe_image
from .methods import METHODS, get_method
from .protector import CATEGORY_PROMPTS, DEFAULT_PROMPT, MAX_SEED
from .resolution import parse_work_size
from .robust import ROBUST_TRANSFORMS

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Pillow's names for the formats the CLI reads (MPO: the multi-picture JPEG of many phones).
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP"}
ALLOWED_FORMATS_TEXT = "PNG, JPEG, WebP, TIFF or BMP"
PRESETS = {"light": 8, "standard": 16}  # name -> eps in 1/255 units
CHECK_STRENGTH = 0.3  # SDEdit strength of "Check protection"
PREVIEW_SIZE = 1024  # longest side of the pictures shown in the page
ZIP_NAME = "mimicshield-protected.zip"
STALE_SECONDS = 2 * 3600  # session folders older than this, without a live tab, are removed


class JobCancelled(Exception):
    """Raised inside a job at its next step once the user pressed Cancel.

    Deliberately not a RuntimeError: the runner records those as one failed image and goes
    on, and Cancel must stop the whole job.
    """


# --- uploads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadLimits:
    """What one job may upload; everything beyond is refused with a message naming the file.

    The byte limits bound the disk the uploads take: per tab (by default one full job's worth,
    ``max_images`` files of ``max_file_bytes``) and for all tabs together.
    """

    max_images: int = 50
    max_file_bytes: int = 50 * 2**20
    max_pixels: int = 50_000_000
    max_tab_bytes: int | None = None  # None: max_images * max_file_bytes
    max_total_bytes: int = 10 * 2**30

    @property
    def tab_bytes(self) -> int:
        if self.max_tab_bytes is not None:
            return self.max_tab_bytes
        return self.max_images * self.max_file_bytes


@dataclass(frozen=True)
class Upload:
    """An uploaded file that passed validation; ``name`` is the name the user gave it."""

    path: Path
    name: str
    width: int
    height: int
    size: int = 0  # bytes on disk
    digest: str = ""  # sha256 of the content: the same picture uploaded twice is one upload


@dataclass(frozen=True)
class UploadRoom:
    """The bytes a tab's list of uploads may take: under the tab's own limit, and under what is
    left of the app's limit once the other tabs' uploads are counted."""

    tab: int
    app: int
    limits: UploadLimits

    def refusal(self, name: str, total: int) -> str | None:
        """Why a file that brings the list to ``total`` bytes is left out, or None."""
        if total > self.tab:
            return (
                f"{name}: left out: this tab's uploads would pass "
                f"{_gigabytes(self.limits.tab_bytes)}, this app's limit per tab. Protect these "
                "first, then upload the rest."
            )
        if total > self.app:
            return (
                f"{name}: left out: the uploads of all open tabs would pass "
                f"{_gigabytes(self.limits.max_total_bytes)}, this app's limit. Try again once "
                "other jobs are done and their tabs closed."
            )
        return None


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP"


def _gigabytes(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GB"
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"


def _check_upload(path: Path, name: str, limits: UploadLimits, verify: bool = False) -> Upload:
    """One file: its size, then what its *content* is (never its name), then its pixel count;
    with ``verify``, every pixel is decoded too (a truncated file has a valid header)."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageFileError(f"{name}: could not be read ({error.strerror}).") from None
    if size == 0:
        raise ImageFileError(f"{name}: empty file (0 bytes).")
    if size > limits.max_file_bytes:
        raise ImageFileError(
            f"{name}: {size / 2**20:.1f} MB is more than this app's limit of "
            f"{limits.max_file_bytes / 2**20:.0f} MB per file."
        )
    try:
        with Image.open(path) as opened:
            file_format = opened.format
    except UnidentifiedImageError:
        raise ImageFileError(
            f"{name}: not an image. Its content is not {ALLOWED_FORMATS_TEXT}, whatever its "
            "name says."
        ) from None
    except Image.DecompressionBombError:
        raise ImageFileError(
            f"{name}: too many pixels (more than {_megapixels(limits.max_pixels)})."
        ) from None
    except OSError as error:
        raise ImageFileError(f"{name}: corrupt or unreadable image ({error}).") from None
    if file_format not in ALLOWED_FORMATS:
        raise ImageFileError(f"{name}: a {file_format} file; use {ALLOWED_FORMATS_TEXT}.")
    try:
        header = probe_image(path)
    except ImageFileError as error:  # the message names the temporary path: show the name
        raise ImageFileError(str(error).replace(str(path), name)) from None
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise ImageFileError(
            f"{name}: {header.width} × {header.height} pixels ({_megapixels(pixels)}) is more "
            f"than this app's limit of {_megapixels(limits.max_pixels)}; make it smaller first."
        )
    if verify:  # after the pixel limit: never decode what is too big to protect
        _decode_fully(path, name, header.deep_colour)
    from .runner import sha256_file

    return Upload(path, name, header.width, header.height, size, sha256_file(path))


def _decode_fully(path: Path, name: str, deep_colour: bool) -> None:
    """Decode every pixel as Protect will, so a truncated or damaged file is refused on upload
    rather than after the model has loaded. 16-bit colour goes through :func:`load_image`,
    which reads it with OpenCV or tifffile; everything else decodes in Pillow, as there."""
    try:
        if deep_colour:
            load_image(path)
        else:
            with Image.open(path) as opened:
                opened.load()
    except ImageFileError as error:
        raise ImageFileError(str(error).replace(str(path), name)) from None
    except Exception as error:  # noqa: BLE001 - each decoder fails on damaged data its own way
        raise ImageFileError(
            f"{name}: damaged or incomplete image ({_one_line(error)}); export or copy it again."
        ) from None


def validate_uploads(
    paths: Iterable[str | Path],
    limits: UploadLimits,
    *,
    room: UploadRoom | None = None,
    verify: bool = False,
    checked: dict | None = None,
) -> tuple[list[Upload], list[str]]:
    """The uploads to protect, and one message per file refused, repeated or left over the
    count limit (or, given ``room``, the byte limits). ``verify`` decodes every file.

    ``checked`` remembers each file's result (by path, size and modification time): every
    upload event sends the whole list, and decoding and hashing fifty large photos again for
    each added file took minutes.
    """
    accepted: list[Upload] = []
    problems: list[str] = []
    paths = [Path(p) for p in paths]
    first_of: dict[str, Upload] = {}  # content digest -> the upload kept for it
    total = 0
    for path in paths[: limits.max_images]:
        try:
            upload = _remembered_check(path, limits, verify, checked)
        except ImageFileError as error:
            problems.append(str(error))
            continue
        if upload.digest in first_of:
            problems.append(
                f"{path.name}: the same image as {first_of[upload.digest].name}; "
                "it is protected once."
            )
            continue
        if room is not None and (refusal := room.refusal(path.name, total + upload.size)):
            problems.append(refusal)
            continue
        accepted.append(upload)
        first_of[upload.digest] = upload
        total += upload.size
    if len(paths) > limits.max_images:
        problems.append(
            f"{len(paths)} files uploaded; this app takes at most {limits.max_images} per job, "
            f"so the last {len(paths) - limits.max_images} were left out."
        )
    return accepted, problems


def _remembered_check(path: Path, limits: UploadLimits, verify: bool, checked: dict | None):
    """:func:`_check_upload`, or its earlier result for the same unchanged file (a decoded
    file also answers a check that does not decode)."""
    if checked is None:
        return _check_upload(path, path.name, limits, verify)
    try:
        stat = path.stat()
    except OSError:
        return _check_upload(path, path.name, limits, verify)  # which says what is wrong
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    result, decoded = checked.get(key, (None, False))
    if result is None or (verify and not decoded):
        try:
            result = _check_upload(path, path.name, limits, verify)
        except ImageFileError as error:
            result = error
        checked[key] = (result, verify)
    if isinstance(result, ImageFileError):
        raise result
    return result


def protected_name(name: str) -> str:
    """``art.png`` -> ``art-protected.png``: a download must not be mistaken for (or saved
    over) the original. The runner gives it the output format's suffix."""
    path = Path(name)
    return f"{path.stem}-protected{path.suffix}"


def _unique_names(names: Sequence[str]) -> list[str]:
    """File names whose stems are unique, because every output is saved as ``STEM.png``."""
    taken: set[str] = set()
    unique = []
    for name in names:
        stem, suffix = Path(name).stem or "image", Path(name).suffix
        candidate, n = stem, 2
        while candidate.lower() in taken:
            candidate, n = f"{stem}-{n}", n + 1
        taken.add(candidate.lower())
        unique.append(candidate + suffix)
    return unique


# --- settings --------------------------------------------------------------------------------


def split_values(text: str | None, separators: str = "\n") -> tuple[str, ...]:
    """``"a\nb"`` -> ("a", "b"): several values typed in one box (one model per line)."""
    if not text:
        return ()
    return tuple(v.strip() for v in re.split(f"[{separators}]", text) if v.strip())


def per_model(
    values: str | Sequence[str | None] | None, count: int, what: str, separators: str = "\n"
) -> tuple[str | None, ...]:
    """One value per model, as ``mimicshield protect`` takes them: none, or one each in order;
    ``auto`` (or None) means "not given" at its position."""
    if values is None or isinstance(values, str):
        values = split_values(values, separators)
    values = tuple("auto" if v is None else str(v).strip() for v in values)
    if all(v.lower() == "auto" for v in values):  # none given, at any position
        return (None,) * count
    if len(values) != count:
        raise ValueError(
            f"{what}: give one value per model ({count}, 'auto' for the default); "
            f"got {len(values)}."
        )
    return tuple(None if v.lower() == "auto" else v for v in values)


@dataclass(frozen=True)
class ProtectSettings:
    """Every option of ``mimicshield protect``, with its defaults, as the page submits them.

    ``eps`` and ``step_size`` are in 1/255 units, as on the command line. Several models make an
    ensemble; ``model_config`` and ``family`` then hold one value per model. ``work_size`` None
    is the CLI's default (measured, raised to the models' own size). ``overwrite`` has no
    counterpart: every job writes into a fresh folder.
    """

    # text typed in the page (one value per line) is split into tuples in __post_init__
    model: tuple[str, ...] | str = (DEFAULT_MODEL,)
    model_weight: tuple[float, ...] | None = None
    model_config: tuple[str | None, ...] | str | None = None
    family: tuple[str | None, ...] | str | None = None
    device: str = "auto"
    dtype: str = "auto"
    method: str = DEFAULT_METHOD
    eps: float = 16
    steps: int = 100
    step_size: float = 1
    prompt: str | None = None
    category: str | None = None
    target: str | None = None  # an uploaded image path (photoguard, mist, sdst-)
    seed: int = 0
    batch_size: int = 0  # 0: as many as the card holds (``--batch-size auto``)
    posterior: str = "sample"
    sdst_r: float = 5.0
    robust: tuple[str, ...] = ()
    low_memory: bool = False
    compile_networks: bool = False
    cuda_graphs: bool = False
    nondeterministic: bool = False
    work_size: str | None = None
    tile_size: int = DEFAULT_TILE_SIZE
    file_format: str = "png"
    quality: int = 95
    metadata: bool = True
    strip_metadata: bool = False

    def __post_init__(self) -> None:
        """The checks ``mimicshield protect`` makes, with the same messages where they apply."""
        from .families import FAMILIES

        if isinstance(self.model, str):
            object.__setattr__(self, "model", split_values(self.model))
        if not self.model:
            raise ValueError("Give a model: a hub id, a local folder or a .safetensors file.")
        count = len(self.model)
        configs = per_model(self.model_config, count, "Model config")
        families = per_model(self.family, count, "Family", "\n, ")
        object.__setattr__(self, "model_config", configs)
        object.__setattr__(self, "family", families)
        for name in families:
            if name is not None and name not in FAMILIES:
                raise ValueError(f"Family must be auto, {', '.join(FAMILIES)}; got {name!r}.")
        if self.model_weight is not None:
            weights = tuple(float(w) for w in self.model_weight)
            if len(weights) != count or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(
                    f"Model weights: give one positive weight per model ({count}); got "
                    f"{list(weights)}."
                )
            object.__setattr__(self, "model_weight", weights)
        method = get_method(self.method)
        if self.prompt and self.category:
            raise ValueError("Give a prompt or a category, not both.")
        if self.category and self.category not in CATEGORY_PROMPTS:
            raise ValueError(f"Unknown category {self.category!r}.")
        if self.target and not method.needs_target:
            raise ValueError(
                f"A target image is only used by photoguard, mist and sdst-, not {self.method}."
            )
        if not 1 <= self.eps <= 255:
            raise ValueError(f"ε must be between 1 and 255 (in 1/255 units); got {self.eps:g}.")
        if not 0 < self.step_size <= 255:
            raise ValueError(f"α must be in (0, 255] (in 1/255 units); got {self.step_size:g}.")
        if self.cuda_graphs and (self.compile_networks or self.low_memory):
            raise ValueError(
                "CUDA graphs do not combine with torch.compile or low memory; choose one."
            )
        if self.steps < 1:
            raise ValueError(f"Steps must be at least 1; got {self.steps}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"The seed must be between 0 and {MAX_SEED}; got {self.seed}.")
        if self.batch_size < 0:
            raise ValueError("The batch size must be at least 0 (0: automatic).")
        if self.tile_size < 64:
            raise ValueError(f"The tile size must be at least 64; got {self.tile_size}.")
        if self.file_format not in ("png", "jpeg"):
            raise ValueError(f"The format must be png or jpeg; got {self.file_format!r}.")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100; got {self.quality}.")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"The posterior must be sample or mean; got {self.posterior!r}.")
        try:
            parse_work_size(self.work_size or "native")
        except ValueError as error:
            raise ValueError(f"Work size: {error}") from None

    @property
    def chosen_prompt(self) -> str:
        if self.category:
            return CATEGORY_PROMPTS[self.category]
        return self.prompt or DEFAULT_PROMPT

    @property
    def model_key(self) -> tuple:
        """What makes loaded models reusable: the performance options change them in place."""
        return (
            self.model,
            self.model_config,
            self.family,
            self.device,
            self.dtype,
            self.low_memory,
            self.compile_networks,
        )

    def output_options(self, native_sizes: Iterable[int | None] = ()):
        """The CLI's output options; the default work size is raised to the models' size."""
        from .families import default_work_size
        from .runner import OutputOptions

        if self.work_size:
            work_size = parse_work_size(self.work_size)
        else:
            work_size = default_work_size(DEFAULT_WORK_SIZE, native_sizes)
        return OutputOptions(
            work_size=work_size,
            tile_size=self.tile_size,
            file_format=self.file_format,
            quality=self.quality,
            provenance=self.metadata,
            strip_metadata=self.strip_metadata,
        )

    def protector(self, engine, target: Tensor | None = None):
        from .protector import Protector

        return Protector(
            engine,
            self.method,
            target=target,
            eps=self.eps / 255,
            step_size=self.step_size / 255,
            steps=self.steps,
            prompt=self.chosen_prompt,
            posterior=self.posterior,
            r=self.sdst_r,
            seed=self.seed,
            robust=self.robust,
            cuda_graphs=self.cuda_graphs,
            deterministic=not self.nondeterministic,
        )


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


# --- the service -----------------------------------------------------------------------------


def _session_folder_name(session: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64] or "anonymous"


def _user_manifest(path: Path, job: "Job") -> str:
    """The job's manifest.json as the user gets it in the zip: each ``input`` is the name of
    the file they uploaded, not the server's temporary copy (whose path names the session)."""
    manifest = json.loads(path.read_text())
    uploaded = {str(image.input): image.uploaded_as or image.name for image in job.images}
    for entry in manifest.get("images", []):
        entry["input"] = uploaded.get(entry.get("input"), Path(str(entry.get("input"))).name)
    return json.dumps(manifest, indent=2)


class ProtectionService:
    """Everything the page does, without Gradio: one model, one job at a time, temp files.

    Args:
        settings: the defaults shown in the page (the ``mimicshield ui`` options).
        limits: upload limits.
        allow_model_choice: whether the page may load another model than ``settings.model``.
            Off when the app is exposed beyond this computer: a path typed in a browser must not
            make the server read arbitrary local files.
        lpips_weights: ``lpips_alexnet.safetensors`` for the check (default: the same lookup
            as ``mimicshield evaluate``).
        work_root: where jobs and Gradio's upload cache live; a fresh temporary folder by
            default, removed by :meth:`close`.
    """

    def __init__(
        self,
        settings: ProtectSettings | None = None,
        *,
        limits: UploadLimits | None = None,
        allow_model_choice: bool = True,
        lpips_weights: str | Path | None = None,
        work_root: str | Path | None = None,
    ) -> None:
        self.defaults = settings or ProtectSettings()
        self.limits = limits or UploadLimits()
        self.allow_model_choice = allow_model_choice
        self.lpips_weights = lpips_weights
        self._owns_root = work_root is None
        root = tempfile.mkdtemp(prefix="mimicshield-ui-") if work_root is None else work_root
        self.work_root = Path(root)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.work_root / "uploads"  # Gradio's cache (GRADIO_TEMP_DIR)
        # Jobs live inside Gradio's cache: Gradio serves files there as they are, where it
        # copies any other file it shows into the cache, and a closed tab's copies would stay.
        self.sessions_dir = self.cache_dir / "sessions"
        self._gpu = threading.Lock()  # held while a job computes: one at a time
        self._model_lock = threading.Lock()
        self._models: list = []
        self._auto_batch = None  # the batch-size rule of the loaded models
        self._model_key: tuple | None = None
        self._lpips = None
        # Cancellation belongs to each job: a tab's next job takes the flag armed for it, so
        # a Cancel pressed just before another Protect still stops the job that was running.
        self._armed: dict[str, threading.Event] = {}  # the flag a tab's next job takes
        self._checked: dict = {}  # upload check results, see validate_uploads
        self._running: dict[str, set[threading.Event]] = {}  # flags of a tab's started jobs
        self._uploads: dict[str, set[Path]] = {}  # Gradio's cached copies of a tab's uploads
        # tabs' upload events run at once: one at a time here, so the byte limits hold and
        # no tab deletes a file that another is just recording
        self._upload_lock = threading.RLock()
        self._ended: set[str] = set()  # closed tabs whose job is still stopping
        self.busy = False
        self.closed = False

    # -- devices and models

    def device_label(self, device: str | None = None) -> str:
        """``cuda (NVIDIA H100 80GB HBM3)``, ``mps`` or ``cpu``: what a job would run on."""
        from .models import resolve_device

        try:
            chosen = resolve_device(device or self.defaults.device)
        except ValueError as error:
            return str(error)
        if chosen.type == "cuda":
            return f"{chosen} ({torch.cuda.get_device_name(chosen)})"
        return str(chosen)

    def available_devices(self) -> list[str]:
        from .models import _mps_available

        devices = ["auto", "cpu"]
        if torch.cuda.is_available():
            devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if _mps_available():
            devices.append("mps")
        return devices

    def models_for(self, settings: ProtectSettings) -> list:
        """The loaded models (with their decoders, for the check), reloaded only when they must
        be. Several models make an ensemble; one set is kept in memory at a time."""
        chosen = (settings.model, settings.model_config, settings.family)
        fixed = (self.defaults.model, self.defaults.model_config, self.defaults.family)
        if not self.allow_model_choice and chosen != fixed:
            raise ValueError(
                "This app is reachable from other computers, so its model is fixed to "
                f"{', '.join(self.defaults.model)}; restart `mimicshield ui --model ...` to "
                "change it."
            )
        with self._model_lock:
            if self._models and self._model_key == settings.model_key:
                try:  # low-memory models released their text encoder: new prompts need a reload
                    for model in self._models:
                        model.embed_prompt(settings.chosen_prompt)  # the check's too
                    return self._models
                except RuntimeError:
                    pass
            self._models, self._model_key = [], None
            from .models import load_models
            from .performance import (
                AutoBatchSize,
                apply_performance_options,
                release_cached_memory,
            )

            release_cached_memory()

            models = [
                load_models(
                    source,
                    device=settings.device,
                    dtype=settings.dtype,
                    with_decoder=True,
                    single_file_config=config,
                    family=family,
                )
                for source, config, family in zip(
                    settings.model, settings.model_config, settings.family, strict=True
                )
            ]
            # measured before --compile, which would compile again for the measuring size
            self._auto_batch = AutoBatchSize(models, low_memory=settings.low_memory)
            if settings.low_memory or settings.compile_networks:
                prompts = [settings.chosen_prompt]  # protection's and the SDEdit check's
                for model in models:
                    apply_performance_options(
                        model, prompts, settings.low_memory, settings.compile_networks
                    )
            self._models, self._model_key = models, settings.model_key
            return models

    def preload(self) -> None:
        """Load the default model(s) while the page opens, so the first Protect does not spend
        its first seconds (minutes for a hub download) importing diffusers and reading weights."""
        with contextlib.suppress(Exception):  # the first job reports it, in the page
            self.models_for(self.defaults)

    def _models_or_cancel(self, settings: ProtectSettings, cancel: threading.Event) -> list:
        """:meth:`models_for`, but Cancel does not wait for a load to finish: the load goes on
        in a helper thread (the next job finds the models loaded) and this job stops now."""
        loader = _Worker(lambda: self.models_for(settings))
        loader.start()
        while loader.is_alive():
            loader.join(0.2)
            self._raise_if_cancelled(cancel)
        if loader.error is not None:
            raise loader.error
        return loader.result  # type: ignore[return-value]

    def _lpips_model(self):
        """LPIPS on the CPU (fast enough at 512 px), loaded once."""
        from .evaluation import resolve_lpips_weights
        from .metrics import LPIPS

        if self._lpips is None:
            self._lpips = LPIPS.from_file(resolve_lpips_weights(self.lpips_weights))
        return self._lpips

    # -- sessions and cancellation

    def arm(self, session: str) -> None:
        """Called when the user presses a run button, before the job waits in the queue: the
        coming job gets a flag of its own (an earlier job's Cancel stays in force)."""
        self._armed[session] = threading.Event()

    def cancel(self, session: str) -> bool:
        """Stop every job of this tab: the running one and the one waiting in the queue.

        Returns whether a job of this tab was waiting in the queue and none running: the page
        then says at once that it will not run (a running job's progress says "Cancelling").
        """
        armed = self._armed.get(session)  # set already: an earlier Cancel, said before
        waiting = armed is not None and not armed.is_set() and not self._is_running(session)
        self._armed.setdefault(session, threading.Event()).set()
        # tuple(): a copy taken in one step, as a job thread may leave the set meanwhile
        for event in tuple(self._running.get(session, ())):
            event.set()
        return waiting

    def disarm(self, session: str) -> None:
        """A run that ended before its job started gives back its unused flag, so that a later
        Cancel does not answer that a job is waiting. Not while a job of the tab runs: a flag
        armed then belongs to the tab's next click."""
        armed = self._armed.get(session)
        if armed is not None and not armed.is_set() and not self._is_running(session):
            self._armed.pop(session, None)

    def cancel_requested(self, session: str) -> bool:
        events = [*self._running.get(session, ()), self._armed.get(session)]  # copied at once
        return any(event is not None and event.is_set() for event in events)

    def _start_job(self, session: str) -> threading.Event:
        """The cancel flag of a job of ``session`` that starts now (armed, or a fresh one)."""
        event = self._armed.pop(session, None) or threading.Event()
        self._running.setdefault(session, set()).add(event)
        return event

    def _raise_if_cancelled(self, cancel: threading.Event) -> None:
        if cancel.is_set() or self.closed:
            raise JobCancelled()

    def _is_running(self, session: str) -> bool:
        return bool(self._running.get(session))

    def session_folder(self, session: str) -> Path:
        return self.sessions_dir / _session_folder_name(session)

    def end_session(self, session: str) -> None:
        """The tab was closed: stop its job and delete its files (once the job has stopped)."""
        self.cancel(session)
        if self._is_running(session):
            self._ended.add(session)
        else:
            self._forget(session)

    def remember_uploads(self, session: str, paths: Iterable[str | Path | None]) -> None:
        """Gradio's cached copies of the files a tab uploaded, deleted when the tab closes."""
        cache = self.cache_dir.resolve()
        with self._upload_lock:
            for path in (Path(p).resolve() for p in paths if p):
                if path.is_relative_to(cache):  # never a file outside the app's cache
                    self._uploads.setdefault(session, set()).add(path)

    def release_uploads(self, session: str, keep: Iterable[str | Path | None]) -> None:
        """Delete this tab's uploads that are not in ``keep`` (its image list and target):
        refused, left out, removed or replaced files go at once, not when the tab closes."""
        kept = {Path(p).resolve() for p in keep if p}
        with self._upload_lock:
            held = self._uploads.get(session, set())
            for path in [p for p in held if p not in kept]:
                held.discard(path)
                self._delete_upload(path)

    def _delete_upload(self, path: Path) -> None:
        """Delete an upload no tab holds any more. Gradio stores a file under the digest of its
        content and its name, so two tabs that upload the same file share one path."""
        if any(path in held for held in tuple(self._uploads.values())):
            return
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # Gradio's folder for it, unless it holds others
            path.parent.rmdir()

    def upload_bytes(self) -> int:
        """What every upload (all tabs, and any Gradio stored that no event reported) takes on
        disk: the upload cache without the job folders."""
        total = 0
        for folder, subfolders, names in os.walk(self.cache_dir):
            if Path(folder) == self.cache_dir:
                subfolders[:] = [d for d in subfolders if d != self.sessions_dir.name]
            for name in names:
                with contextlib.suppress(OSError):
                    total += (Path(folder) / name).stat().st_size
        return total

    def _room(self, session: str, paths: Sequence[Path]) -> UploadRoom:
        """The bytes ``paths``, the tab's image list, may take under the byte limits."""
        listed = {p.resolve() for p in paths if p.is_file()}
        listed_bytes = sum(p.stat().st_size for p in listed)
        own_other = sum(  # the tab's target image
            p.stat().st_size
            for p in self._uploads.get(session, ())
            if p not in listed and p.is_file()
        )
        others = self.upload_bytes() - listed_bytes
        return UploadRoom(
            self.limits.tab_bytes - own_other, self.limits.max_total_bytes - others, self.limits
        )

    def accept_uploads(
        self, session: str, paths: Iterable[str | Path], target: str | Path | None = None
    ) -> tuple[list[Upload], list[str]]:
        """The check of a tab's image list when files arrive: every pixel decoded, repeats
        dropped, the byte limits applied; what is not kept is deleted from disk now."""
        paths = [Path(p) for p in paths]
        self.remember_uploads(session, [*paths, target])
        # the new files are decoded here, outside the lock every tab's uploads take
        validate_uploads(paths, self.limits, verify=True, checked=self._checked)
        with self._upload_lock:
            room = self._room(session, paths)
            accepted, problems = validate_uploads(
                paths, self.limits, room=room, verify=True, checked=self._checked
            )
            self.release_uploads(session, [*(u.path for u in accepted), target])
        return accepted, problems

    def accept_target(
        self, session: str, target: str | Path | None, images: Iterable[str | Path]
    ) -> str | None:
        """The check of a newly chosen target image, every pixel decoded: its path (None when
        cleared). A replaced or refused target is deleted at once; a refusal raises."""
        self.remember_uploads(session, [target])
        try:
            kept = self.validate_target(target, verify=True)
        except ImageFileError:
            self.release_uploads(session, images)
            raise
        self.release_uploads(session, [*images, kept])
        return kept

    def _forget(self, session: str) -> None:
        shutil.rmtree(self.session_folder(session), ignore_errors=True)
        with self._upload_lock:
            for path in self._uploads.pop(session, ()):
                self._delete_upload(path)
        self._armed.pop(session, None)
        self._ended.discard(session)

    def _leave(self, session: str, cancel: threading.Event) -> None:
        """A job of ``session`` is over."""
        self._running.get(session, set()).discard(cancel)
        if not self._is_running(session):
            self._running.pop(session, None)
            if session in self._ended:
                self._forget(session)

    def _sweep(self) -> None:
        """Remove the folders of sessions whose tabs went away without saying so."""
        if not self.sessions_dir.is_dir():
            return
        live = {_session_folder_name(s) for s in tuple(self._running)}
        now = time.time()
        for folder in self.sessions_dir.iterdir():
            if folder.name not in live and now - folder.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)

    # -- validation

    def validate(self, paths: Iterable[str | Path]) -> tuple[list[Upload], list[str]]:
        """The check when a job starts: headers and repeats (the pixels were checked on upload,
        and unchanged files are not read again)."""
        return validate_uploads(paths, self.limits, checked=self._checked)

    def validate_target(self, path: str | Path | None, verify: bool = False) -> str | None:
        if not path:
            return None
        try:
            return str(_check_upload(Path(path), Path(path).name, self.limits, verify).path)
        except ImageFileError as error:
            raise ImageFileError(f"Target image {error}") from None

    # -- protection

    def protect(
        self,
        session: str,
        uploads: Sequence[Upload],
        settings: ProtectSettings,
        progress: JobProgress | None = None,
    ) -> Job:
        """Protect ``uploads`` with ``settings`` into a fresh folder of this session.

        Blocks until done; raises :class:`JobCancelled` if cancelled before any image finished,
        otherwise returns the job with ``cancelled`` set and the finished images kept.

        The tab's earlier results stay until this job has protected something: a job that is
        cancelled, fails or protects nothing leaves them as they were (and its folder goes).
        Outputs are named ``STEM-protected.EXT``, so a download never takes the original's name.
        """
        progress = progress or JobProgress()
        if not uploads:
            raise ValueError("No images to protect.")
        cancel = self._start_job(session)
        folder = self.session_folder(session)
        job = Job(secrets.token_hex(4), folder / secrets.token_hex(4), settings)
        try:
            self._sweep()
            files, by_path = self._copy_inputs(job, uploads)
            target = None
            if settings.target:
                target = load_image(self.validate_target(settings.target)).rgb

            progress.phase = "Waiting for the previous job to stop"
            with self._gpu:
                self.busy = True
                try:
                    self._raise_if_cancelled(cancel)
                    progress.phase = f"Loading {', '.join(settings.model)}"
                    models = self._models_or_cancel(settings, cancel)
                    dtype = str(models[0].dtype).removeprefix("torch.")
                    job.device = f"{self.device_label(str(models[0].device))} · {dtype}"
                    self._raise_if_cancelled(cancel)
                    out_dir = job.folder / "protected"
                    self._run(cancel, job, files, by_path, out_dir, models, target, progress)
                finally:
                    self.busy = False
            if job.protected:
                self._remove_other_jobs(job)
            else:
                shutil.rmtree(job.folder, ignore_errors=True)
        except BaseException:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        finally:
            self._leave(session, cancel)  # a closed tab's folder goes here
        return job

    def _copy_inputs(self, job: Job, uploads: Sequence[Upload]) -> tuple[list, dict]:
        """Copy the uploads into the job's folder under unique names; each one's output is
        ``STEM-protected.EXT`` (the runner names outputs after ``InputFile.relative``)."""
        from .runner import InputFile

        inputs_dir = job.folder / "inputs"
        inputs_dir.mkdir(parents=True)
        files: list[InputFile] = []
        by_path: dict[str, ImageResult] = {}
        for upload, name in zip(uploads, _unique_names([u.name for u in uploads]), strict=True):
            path = inputs_dir / name
            shutil.copyfile(upload.path, path)
            files.append(InputFile(path, Path(protected_name(name))))
            by_path[str(path)] = ImageResult(name, path, uploaded_as=upload.name)
            job.images.append(by_path[str(path)])
        return files, by_path

    def _remove_other_jobs(self, job: Job) -> None:
        """The tab's earlier results, once ``job`` has results to show instead."""
        for folder in job.folder.parent.iterdir():
            if folder != job.folder and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def _run(self, cancel, job, files, by_path, out_dir, models, target, progress) -> None:
        from .ensemble import Ensemble
        from .runner import protect_files

        settings = job.settings
        single = len(models) == 1
        engine = models[0] if single else Ensemble(models, settings.model_weight)
        protector = settings.protector(engine, target)
        header = {  # the same manifest header as `mimicshield protect`
            "model": settings.model[0] if single else list(settings.model),
            "family": models[0].family if single else [m.family for m in models],
            **({} if single else {"model_weights": engine.weights}),
            "device": str(models[0].device),
            "dtype": str(models[0].dtype).removeprefix("torch."),
            "parameters": {
                **protector.config.to_dict(),
                "target": Path(settings.target).name if settings.target else None,
            },
            "seed": settings.seed,
            "deterministic": protector.deterministic,
        }

        def image_started(item, batch: int) -> None:
            self._raise_if_cancelled(cancel)
            progress.phase = "Protecting"
            progress.start_image(by_path[str(item.path)].name, batch)

        def step(done: int, total: int) -> None:
            progress.on_step(done, total)
            self._raise_if_cancelled(cancel)  # the last check before the file is saved
            if done >= total:
                progress.phase = "Saving and measuring"
                progress.start_saving()

        def image_done(result) -> None:
            image = by_path[result.input]
            # messages name the user's file, not the server's temporary copy of it
            error = result.error.replace(result.input, image.uploaded_as) if result.error else None
            image.status, image.error, image.note = result.status, error, result.note
            image.psnr, image.ssim = result.psnr, result.ssim
            image.linf_255, image.seconds = result.linf_255, result.seconds
            if result.output:
                image.output = out_dir / result.output
            progress.done_images += 1
            progress.saving = False

        progress.phase = "Protecting"
        progress.start_run(len(files))
        started = time.perf_counter()
        try:
            protect_files(
                files,
                out_dir,
                protector,
                options=settings.output_options(m.native_size for m in models),
                batch_size=settings.batch_size
                or partial(self._auto_batch, tile_size=settings.tile_size, method=settings.method),
                manifest_header=header,
                on_image_start=image_started,
                on_step=step,
                on_image_done=image_done,
            )
        except JobCancelled:
            job.cancelled = True
            if not job.protected:
                raise
        job.seconds = time.perf_counter() - started
        for image in job.images:
            if image.status == "pending":
                image.status = "cancelled"
        progress.phase = "Preparing previews and the zip"
        for image in job.protected:
            self._previews(job, image)
        job.zip_path = self._zip(job, out_dir)

    def _previews(self, job: Job, image: ImageResult) -> None:
        """Before, after and the amplified perturbation, made from preview-size copies: the
        page shows them 320 px high, and full-size copies of a big photo cost gigabytes."""
        clean, clean_pixels = _preview_copies(image.input)
        protected, protected_pixels = _preview_copies(image.output)
        previews = job.folder / "previews" / Path(image.name).stem
        image.before = _save_preview(clean, previews / "before.png")
        image.after = _save_preview(protected, previews / "after.png")
        # sampled, not averaged pixels: averaging would wash the perturbation out to grey
        difference = amplify(protected_pixels, clean_pixels, job.settings.eps / 255)
        image.perturbation = _save_preview(difference, previews / "perturbation.png")

    def _zip(self, job: Job, out_dir: Path) -> Path | None:
        """Every protected file and the manifest, stored as they are (PNG is compressed)."""
        if not job.protected:
            return None
        path = job.folder / ZIP_NAME
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for image in job.protected:
                archive.write(image.output, image.output.relative_to(out_dir).as_posix())
            manifest = out_dir / "manifest.json"
            if manifest.is_file():
                archive.writestr(manifest.name, _user_manifest(manifest, job))
        return path

    # -- the check

    def check(
        self, session: str, job: Job, name: str, progress: JobProgress | None = None
    ) -> CheckResult:
        """SDEdit (strength 0.3, the job's seed) of the clean and the protected image, at the
        model's native resolution (the square crop an attacker feeds it), with LPIPS."""
        from .images import save_png
        from .mimicry import fit_image, model_resolution, sdedit

        progress = progress or JobProgress()
        image = job.image(name)
        if image is None:
            raise ValueError("Choose a protected image first.")
        if not (image.input.is_file() and image.output and image.output.is_file()):
            hours = STALE_SECONDS // 3600
            raise ValueError(
                f"These results have expired (files are kept {hours} hours after the last job); "
                "protect the images again."
            )
        cancel = self._start_job(session)
        try:
            progress.phase = "Waiting for the previous job to stop"
            with self._gpu:
                self.busy = True
                try:
                    self._raise_if_cancelled(cancel)
                    progress.phase = f"Loading {job.settings.model[0]}"
                    model = self._models_or_cancel(job.settings, cancel)[0]  # an ensemble's first
                    resolution = model_resolution(model)
                    clean = fit_image(load_image(image.input).rgb, resolution)
                    protected = fit_image(load_image(image.output).rgb, resolution)
                    progress.phase = "Check: SDEdit of the clean and the protected image"
                    progress.start_run(1)
                    progress.start_image(image.name, 1)

                    def step(done: int, total: int) -> None:
                        progress.on_step(done, total)
                        self._raise_if_cancelled(cancel)

                    outputs = sdedit(
                        model,
                        torch.stack([clean, protected]),
                        CHECK_STRENGTH,
                        prompt=job.settings.chosen_prompt,
                        seed=job.settings.seed,
                        callback=step,
                    )
                finally:
                    self.busy = False
        finally:
            self._leave(session, cancel)
        folder = job.folder / "check" / Path(image.name).stem
        result = CheckResult(
            save_png(outputs[0], folder / "sdedit-clean.png"),
            save_png(outputs[1], folder / "sdedit-protected.png"),
            resolution,
        )
        try:
            lpips = self._lpips_model()
            with torch.no_grad():
                scores = lpips(outputs, torch.stack([clean, clean]))
                between = lpips(outputs[1:], outputs[:1])
            result.lpips_clean, result.lpips_protected = float(scores[0]), float(scores[1])
            result.lpips_between = float(between[0])
        except (FileNotFoundError, OSError, RuntimeError) as error:
            result.lpips_note = lpips_unavailable(error)
        return result

    def close(self) -> None:
        """Stop every job and delete every temporary file this app made."""
        self.closed = True
        for events in list(self._running.values()):
            for event in list(events):
                event.set()
        if self._owns_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
        else:
            shutil.rmtree(self.sessions_dir, ignore_errors=True)
            shutil.rmtree(self.cache_dir, ignore_errors=True)


# --- running a job beside the page ----------------------------------------------------------


class _Worker(threading.Thread):
    """Runs ``fn`` and keeps its result or its exception for the thread that polls it."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True, name="mimicshield-job")
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as error:  # reported to the page, never raised in the server
            self.error = error


def run_beside(
    service: ProtectionService,
    session: str,
    fn: Callable[[JobProgress], object],
    interval: float = 0.5,
) -> Iterator[tuple[JobProgress, _Worker]]:
    """Run ``fn(progress)`` in a thread; yield its progress every ``interval`` s, then once more
    when it has finished. If the page goes away mid-job, the job is cancelled."""
    progress = JobProgress()
    worker = _Worker(lambda: fn(progress))
    worker.start()
    try:
        while worker.is_alive():
            progress.cancel_requested = service.cancel_requested(session)
            yield progress, worker
            worker.join(interval)
        yield progress, worker
    finally:
        if worker.is_alive():
            service.cancel(session)


# --- rendering -------------------------------------------------------------------------------


def _bar(fraction: float, label: str, elem_id: str) -> str:
    percent = f"{100 * max(0.0, min(fraction, 1.0)):.1f}%"
    return (
        f'<div id="{elem_id}" style="margin:6px 0">'
        '<div style="height:10px;border-radius:5px;background:rgba(128,128,128,.25)">'
        f'<div style="height:10px;border-radius:5px;width:{percent};'
        'background:var(--color-accent, #f97316)"></div></div>'
        f'<div style="font-size:.9em;opacity:.85">{html.escape(label)}</div></div>'
    )


def _cancelling_text(progress: JobProgress) -> str:
    """What Cancel is waiting for: nothing (no step has run: loading, queued, reading the
    image), the step that runs, or the image being saved."""
    if progress.saving:
        return "Cancelling: stopping once this image is saved…"
    if progress.run_started is None or progress.step == 0:
        return "Cancelling…"
    return "Cancelling: stopping when this step ends…"


def render_progress(progress: JobProgress) -> str:
    """Two bars, this image and all images, each with its ETA."""
    phase = _cancelling_text(progress) if progress.cancel_requested else progress.phase
    parts = [f'<div id="ms-progress"><b>{html.escape(phase)}</b>']
    if progress.run_started is not None and progress.total_images:
        name = progress.current + (f" (+{progress.batch - 1})" if progress.batch > 1 else "")
        if progress.saving:
            where = "saving the file and measuring PSNR and SSIM"
        else:
            where = (
                f"step {progress.step}/{progress.total_steps or '?'}"
                f" · ETA {format_seconds(progress.image_eta())}"
            )
        parts.append(_bar(progress.image_fraction, f"This image: {name} · {where}", "ms-image-bar"))
        parts.append(
            _bar(
                progress.overall_fraction,
                f"All images: {progress.done_images}/{progress.total_images} done"
                f" · ETA {format_seconds(progress.overall_eta())}",
                "ms-overall-bar",
            )
        )
    parts.append("</div>")
    return "".join(parts)


def message_html(text: str, kind: str = "info", elem_id: str = "ms-message") -> str:
    colours = {"info": "inherit", "error": "#dc2626", "ok": "#16a34a", "warning": "#d97706"}
    return (
        f'<div id="{elem_id}" class="ms-{kind}" style="color:{colours[kind]}">'
        f"{html.escape(text)}</div>"
    )


def messages_html(lines: Sequence[str], kind: str, elem_id: str) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    colour = "#dc2626" if kind == "error" else "inherit"
    return f'<div id="{elem_id}" class="ms-{kind}" style="color:{colour}"><ul>{items}</ul></div>'


def _number(value: float | None, template: str) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else template.format(value)


def results_table(job: Job) -> list[list[str]]:
    return [
        [
            image.name,
            image.status,
            _number(image.psnr, "{:.2f}"),
            _number(image.ssim, "{:.4f}"),
            _number(image.linf_255, "{:.0f}"),
            _number(image.seconds, "{:.2f}"),
            image.error or image.note or "",
        ]
        for image in job.images
    ]


def image_summary(job: Job, image: ImageResult | None) -> str:
    if image is None:
        return ""
    text = (
        f"{image.name}: PSNR {_number(image.psnr, '{:.2f}')} dB · SSIM "
        f"{_number(image.ssim, '{:.4f}')} · L∞ {_number(image.linf_255, '{:.0f}')}/255 "
        f"(budget {job.settings.eps:g}/255)"
    )
    return message_html(text, "info", "ms-image-metrics")


def lpips_unavailable(error: BaseException) -> str:
    """Why the check has no LPIPS scores, in words for the person at the page, and how whoever
    starts the app can add them (the CLI's own message speaks of --lpips-weights only)."""
    text = str(error)
    if "Could not download" in text:
        why = "the LPIPS weights could not be downloaded"
    elif "HF_HUB_OFFLINE" in text:
        why = "this app has no LPIPS weights, and downloads are switched off (HF_HUB_OFFLINE)"
    elif "not found" in text or "does not point to a file" in text:
        why = "the LPIPS weights file this app was given does not exist"
    else:
        why = f"the LPIPS weights could not be read ({_one_line(error)})"
    return (
        f"LPIPS scores unavailable: {why}. The two pictures above still show the mimicry. "
        "For the scores, start the app with the weights file: mimicshield ui --lpips-weights "
        "lpips_alexnet.safetensors (or set MIMICSHIELD_LPIPS_WEIGHTS to it)."
    )


def check_summary(result: CheckResult) -> str:
    if result.lpips_clean is None:
        lines = [result.lpips_note or "LPIPS unavailable."]
    else:
        lines = [
            f"LPIPS to the clean image — mimicry of the clean image: {result.lpips_clean:.4f}; "
            f"mimicry of the protected image: {result.lpips_protected:.4f}.",
            f"LPIPS between the two mimicries: {result.lpips_between:.4f}. Higher means the "
            "protection pushed the mimicry further from your image.",
        ]
    lines.append(
        f"SDEdit strength {CHECK_STRENGTH}, same seed, at {result.resolution} px (the square crop "
        "an attacker would use)."
    )
    return messages_html(lines, "info", "ms-check-result")


# --- the page --------------------------------------------------------------------------------

ADVANCED = [  # (name, label): the advanced options, in the order of `mimicshield protect --help`
    ("method", "Method"),
    ("steps", "Steps"),
    ("step_size", "Step size α (in 1/255)"),
    ("category", "Category (uses the paper's prompt)"),
    ("prompt", "Prompt c (empty: 'a photo')"),
    ("target", "Target image (photoguard, mist, sdst-)"),
    ("model_weight", "Ensemble weights, one per model line (empty: equal)"),
    ("model_config", "Config folder of a single-file model (one per model line, 'auto' for none)"),
    ("family", "Family: auto, sd1, sd2-base, sd2-v or sdxl (one per model line)"),
    ("device", "Device"),
    ("dtype", "Precision"),
    ("seed", "Seed"),
    ("batch_size", "Batch size (images of equal size; 0: as many as the GPU holds)"),
    ("posterior", "E(x): posterior sample or mean"),
    ("sdst_r", "sdst- weight r"),
    (
        "robust",
        "Harden against purification (EOT): the clean-ups to withstand; none ticked: no hardening",
    ),
    ("low_memory", "Low memory (slower)"),
    ("compile_networks", "torch.compile (slow first step, faster later)"),
    ("cuda_graphs", "CUDA graphs: replay each step (small batches; experimental)"),
    ("nondeterministic", "CUDA: faster non-deterministic kernels (a seed may not repeat exactly)"),
    ("work_size", "Work size: empty for the measured default, 'native', or pixels (shorter side)"),
    ("tile_size", "Tile size"),
    ("file_format", "Output format (JPEG is lossy: it weakens the protection)"),
    ("quality", "JPEG quality"),
    ("metadata", "Write the 'no AI/ML training' XMP notice"),
    ("strip_metadata", "Privacy: remove EXIF (GPS too), XMP and text comments (ICC kept)"),
]
NO_CATEGORY = "none"
LABELS = dict(ADVANCED)
ROBUST_LABELS = {  # what each --robust name means to someone who has not read the paper
    "jpeg": "JPEG compression",
    "resize": "resizing",
    "blur": "blur",
    "noise": "added noise",
    "none": "the unchanged image too (mixed in with the ticked clean-ups)",
}


def robust_choices() -> list[tuple[str, str]]:
    """(label, --robust name) for each EOT transform: "none" alone, next to jpeg and blur,
    read as "no hardening", which it is not: it adds the unchanged image to the mix."""
    return [(ROBUST_LABELS.get(name, name), name) for name in ROBUST_TRANSFORMS]


def _page_number(values: dict[str, object], name: str, whole: bool = False) -> float:
    """A number box of the page, or a message naming the box (an emptied box gives None)."""
    value = values.get(name)
    label = LABELS.get(name, name).split(" (")[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{label}: enter a number.") from None
    if whole and not number.is_integer():
        raise ValueError(f"{label}: enter a whole number; got {number:g}.")
    return int(number) if whole else number


def _as_text(values: Sequence[object] | None) -> str:
    """A tuple of per-model values as the page shows it: one per line, blank when all unset."""
    if not values or all(v is None for v in values):
        return ""
    return "\n".join(
        "auto" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values
    )


def _settings_from_page(
    service: ProtectionService, values: dict[str, object], preset: str, custom_eps: float
) -> ProtectSettings:
    """The page's widgets -> settings; every check of the CLI runs in ``ProtectSettings``."""
    eps = PRESETS.get(preset, custom_eps)
    weights = split_values(str(values.get("model_weight") or ""), "\n, ")
    try:
        model_weight = tuple(float(w) for w in weights) or None
    except ValueError:
        raise ValueError(f"Ensemble weights must be numbers; got {', '.join(weights)}.") from None
    target = values.get("target")
    category = values.get("category")
    work_size = str(values.get("work_size") or "").strip()
    return replace(
        service.defaults,
        model=split_values(str(values.get("model") or "")) or service.defaults.model,
        model_weight=model_weight,
        model_config=str(values.get("model_config") or ""),
        family=str(values.get("family") or ""),
        device=str(values["device"]),
        dtype=str(values["dtype"]),
        method=str(values["method"]),
        eps=float(eps),
        steps=_page_number(values, "steps", whole=True),
        step_size=_page_number(values, "step_size"),
        prompt=(str(values.get("prompt") or "").strip() or None),
        category=None if category in (None, NO_CATEGORY) else str(category),
        target=service.validate_target(target) if target else None,
        seed=_page_number(values, "seed", whole=True),
        batch_size=_page_number(values, "batch_size", whole=True),
        posterior=str(values["posterior"]),
        sdst_r=_page_number(values, "sdst_r"),
        robust=tuple(values.get("robust") or ()),
        low_memory=bool(values["low_memory"]),
        compile_networks=bool(values["compile_networks"]),
        cuda_graphs=bool(values["cuda_graphs"]),
        nondeterministic=bool(values["nondeterministic"]),
        work_size=work_size or None,
        tile_size=_page_number(values, "tile_size", whole=True),
        file_format=str(values["file_format"]),
        quality=_page_number(values, "quality", whole=True),
        metadata=bool(values["metadata"]),
        strip_metadata=bool(values["strip_metadata"]),
    )


def build_app(service: ProtectionService):
    """The Gradio page. Call after :func:`use_work_root` so uploads land in the service's folder."""
    import gradio as gr

    defaults = service.defaults
    preset_choices = [
        ("Light (ε = 8/255)", "light"),
        ("Standard (ε = 16/255, the paper's)", "standard"),
        ("Custom", "custom"),
    ]
    default_preset = next((k for k, v in PRESETS.items() if v == defaults.eps), "custom")
    picture = {"type": "filepath", "interactive": False, "height": 320}

    with gr.Blocks(
        title="mimicshield",
        analytics_enabled=False,
        delete_cache=(1800, STALE_SECONDS),
    ) as demo:
        gr.Markdown(
            "# mimicshield\nProtect your images against diffusion-model mimicry (img2img, "
            "inpainting, fine-tuning) with a nearly invisible perturbation "
            "(Xue et al., ICLR 2024). Your images stay on this computer."
        )
        device_info = gr.HTML(
            message_html(
                f"Model: {', '.join(defaults.model)} · device: {service.device_label()}",
                "info",
                "ms-device",
            )
        )
        job_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(
                    label="Images: drag and drop one or many",
                    file_count="multiple",
                    file_types=sorted(IMAGE_SUFFIXES),
                    elem_id="ms-upload",
                )
                upload_status = gr.HTML(elem_id="ms-upload-status")
                preset = gr.Radio(
                    preset_choices, value=default_preset, label="Strength", elem_id="ms-preset"
                )
                custom_eps = gr.Slider(
                    1,
                    64,
                    value=defaults.eps,
                    step=1,
                    label="Custom budget ε (in 1/255)",
                    visible=default_preset == "custom",
                    elem_id="ms-eps",
                )
                model = gr.Textbox(
                    value="\n".join(defaults.model),
                    label="Model: hub id, local diffusers folder or .safetensors file "
                    "(several lines: an ensemble)",
                    max_lines=4,
                    interactive=service.allow_model_choice,
                    elem_id="ms-model",
                )
                with gr.Row():
                    protect_button = gr.Button("Protect", variant="primary", elem_id="ms-protect")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="ms-cancel")
                with gr.Accordion("Advanced: every command-line option", open=False):
                    labels = dict(ADVANCED)

                    def opt(name: str) -> dict:
                        return {"label": labels[name], "elem_id": "ms-" + name.replace("_", "-")}

                    choose_model = service.allow_model_choice
                    advanced = {
                        "method": gr.Dropdown(
                            list(METHODS), value=defaults.method, **opt("method")
                        ),
                        # No `minimum=` on number boxes: Gradio's own refusal names no box and
                        # never reaches the progress box; ProtectSettings' messages do both.
                        "steps": gr.Number(value=defaults.steps, precision=0, **opt("steps")),
                        "step_size": gr.Number(value=defaults.step_size, **opt("step_size")),
                        "category": gr.Dropdown(
                            [NO_CATEGORY, *CATEGORY_PROMPTS],
                            value=defaults.category or NO_CATEGORY,
                            **opt("category"),
                        ),
                        "prompt": gr.Textbox(value=defaults.prompt or "", **opt("prompt")),
                        "target": gr.File(file_types=sorted(IMAGE_SUFFIXES), **opt("target")),
                        "target_status": gr.HTML(elem_id="ms-target-status"),
                        "model_weight": gr.Textbox(
                            value=_as_text(defaults.model_weight), **opt("model_weight")
                        ),
                        "model_config": gr.Textbox(
                            value=_as_text(defaults.model_config),
                            interactive=choose_model,
                            **opt("model_config"),
                        ),
                        "family": gr.Textbox(
                            value=_as_text(defaults.family),
                            interactive=choose_model,
                            **opt("family"),
                        ),
                        "device": gr.Dropdown(
                            service.available_devices(), value=defaults.device, **opt("device")
                        ),
                        "dtype": gr.Dropdown(
                            ["auto", "fp32", "fp16", "bf16"], value=defaults.dtype, **opt("dtype")
                        ),
                        "seed": gr.Number(value=defaults.seed, precision=0, **opt("seed")),
                        "batch_size": gr.Number(
                            value=defaults.batch_size, precision=0, **opt("batch_size")
                        ),
                        "posterior": gr.Radio(
                            ["sample", "mean"], value=defaults.posterior, **opt("posterior")
                        ),
                        "sdst_r": gr.Number(value=defaults.sdst_r, **opt("sdst_r")),
                        "robust": gr.CheckboxGroup(
                            robust_choices(), value=list(defaults.robust), **opt("robust")
                        ),
                        "low_memory": gr.Checkbox(value=defaults.low_memory, **opt("low_memory")),
                        "compile_networks": gr.Checkbox(
                            value=defaults.compile_networks, **opt("compile_networks")
                        ),
                        "cuda_graphs": gr.Checkbox(
                            value=defaults.cuda_graphs, **opt("cuda_graphs")
                        ),
                        "nondeterministic": gr.Checkbox(
                            value=defaults.nondeterministic, **opt("nondeterministic")
                        ),
                        "work_size": gr.Textbox(value=defaults.work_size or "", **opt("work_size")),
                        "tile_size": gr.Number(
                            value=defaults.tile_size, precision=0, **opt("tile_size")
                        ),
                        "file_format": gr.Radio(
                            ["png", "jpeg"], value=defaults.file_format, **opt("file_format")
                        ),
                        "quality": gr.Slider(
                            1, 100, value=defaults.quality, step=1, **opt("quality")
                        ),
                        "metadata": gr.Checkbox(value=defaults.metadata, **opt("metadata")),
                        "strip_metadata": gr.Checkbox(
                            value=defaults.strip_metadata, **opt("strip_metadata")
                        ),
                    }
            with gr.Column(scale=3):
                progress_html = gr.HTML(elem_id="ms-progress-box")
                table = gr.Dataframe(
                    headers=["file", "status", "PSNR (dB)", "SSIM", "L∞ (/255)", "seconds", "note"],
                    interactive=False,
                    label="Results",
                    elem_id="ms-results",
                )
                downloads = gr.File(
                    label="Protected files: click one to download it",
                    file_count="multiple",
                    interactive=False,
                    elem_id="ms-downloads",
                )
                zip_button = gr.DownloadButton(
                    "Download all (.zip)", visible=False, elem_id="ms-zip"
                )
                chosen = gr.Dropdown([], label="Show", elem_id="ms-chosen")
                with gr.Row():
                    before = gr.Image(label="Before", **picture)
                    after = gr.Image(label="After (protected)", **picture)
                    perturbation = gr.Image(
                        label="Perturbation, amplified (grey = unchanged)", **picture
                    )
                image_metrics = gr.HTML()
                check_button = gr.Button(
                    "Check protection (SDEdit, strength 0.3)", elem_id="ms-check"
                )
                with gr.Row():
                    mimic_clean = gr.Image(label="Mimicry of the clean image", **picture)
                    mimic_protected = gr.Image(label="Mimicry of the protected image", **picture)
                check_html = gr.HTML()

        target_status = advanced.pop("target_status")  # a message, not an option
        target_file = advanced["target"]
        options = {"model": model, **advanced}
        page_inputs = {files, preset, custom_eps, *options.values()}

        # -- strength presets: choosing a preset sets ε; moving the slider means Custom

        def on_preset(choice: str):
            if choice in PRESETS:
                return gr.update(value=PRESETS[choice], visible=False)
            return gr.update(visible=True)

        preset.change(on_preset, preset, custom_eps, queue=False, show_progress="hidden")

        # -- uploads are checked as they arrive, and again when the job starts

        def on_upload(paths: list[str] | None, target_path: str | None, request: gr.Request):
            """New files: check them all; refused, repeated and left-out files leave the list
            (and the disk). Not on `change`: the list this returns would trigger it again."""
            if not paths:
                return "", gr.update()
            accepted, problems = service.accept_uploads(request.session_hash, paths, target_path)
            status = upload_summary([u.name for u in accepted], problems)
            kept = [str(u.path) for u in accepted]
            return status, (gr.update(value=kept or None) if problems else gr.update())

        def on_files_removed(paths: list[str] | None, target_path: str | None, request: gr.Request):
            service.release_uploads(request.session_hash, [*(paths or []), target_path])
            return upload_summary([Path(p).name for p in paths or []], [])

        quick = {"concurrency_limit": None, "show_progress": "hidden"}
        files.upload(on_upload, [files, target_file], [upload_status, files], **quick)
        files.delete(on_files_removed, [files, target_file], upload_status, **quick)
        files.clear(on_files_removed, [files, target_file], upload_status, **quick)

        def on_target(path: str | None, paths: list[str] | None, request: gr.Request):
            """A new target image is checked (and recorded, to be deleted with the tab)."""
            try:
                service.accept_target(request.session_hash, path, paths or [])
            except ImageFileError as error:
                return message_html(str(error), "error", "ms-target-error"), None
            return "", gr.update()

        def on_target_cleared(paths: list[str] | None, request: gr.Request):
            service.release_uploads(request.session_hash, paths or [])
            return ""

        target_file.upload(on_target, [target_file, files], [target_status, target_file], **quick)
        target_file.clear(on_target_cleared, files, target_status, **quick)

        # -- protect (one job at a time across all tabs) and cancel

        def arm(request: gr.Request):
            service.arm(request.session_hash)
            if service.busy:
                return message_html(
                    "Queued: another job is running (maybe in another tab); yours waits its turn.",
                    "warning",
                    "ms-queued",
                )
            return message_html("Starting…", "info", "ms-starting")

        def run_protect(data: dict, request: gr.Request):
            try:
                yield from protect_updates(data, request.session_hash)
            finally:  # ended before its job started (nothing to protect, bad settings)?
                service.disarm(request.session_hash)

        def protect_updates(data: dict, session: str):
            """Nothing on the page is cleared until the new job has results: the earlier ones
            stay on show (and on disk) through a job that is cancelled or fails."""
            if service.cancel_requested(session):
                yield {progress_html: message_html("Cancelled.", "warning")}
                return
            uploads, problems = service.validate(data[files] or [])
            if not uploads:
                text = problems or ["Add one or more images first (drag them onto the box)."]
                yield {progress_html: messages_html(text, "error", "ms-message")}
                return
            try:
                values = {name: data[component] for name, component in options.items()}
                settings = _settings_from_page(service, values, data[preset], data[custom_eps])
            except (ValueError, TypeError, ImageFileError) as error:
                yield {progress_html: message_html(str(error), "error")}
                return
            yield {progress_html: message_html("Starting…", "info")}

            def work(progress: JobProgress) -> Job:
                return service.protect(session, uploads, settings, progress)

            for progress, worker in run_beside(service, session, work):
                if worker.is_alive():
                    yield {progress_html: render_progress(progress)}
            if worker.error is not None:
                if isinstance(worker.error, JobCancelled):
                    text = "Cancelled: the job stopped before any image was finished."
                    kind = "warning"
                else:
                    text, kind = f"Protection failed: {_one_line(worker.error)}", "error"
                yield {progress_html: message_html(text, kind)}
                return
            job: Job = worker.result
            lines, kind = job_summary(job, problems)
            if not job.protected:  # nothing new to show: the earlier results stay
                yield {progress_html: messages_html(lines, kind, "ms-done")}
                return
            yield _job_outputs(job, lines, kind)

        def _job_outputs(job: Job, lines: list[str], kind: str) -> dict:
            protected = job.protected
            first = protected[0]
            return {
                job_state: job,
                device_info: message_html(
                    f"Model: {', '.join(job.settings.model)} · device: {job.device}",
                    "info",
                    "ms-device",
                ),
                progress_html: messages_html(lines, kind, "ms-done"),
                table: results_table(job),
                downloads: [str(i.output) for i in protected],
                zip_button: gr.update(value=str(job.zip_path), visible=bool(job.zip_path)),
                chosen: gr.update(choices=[i.name for i in protected], value=first.name),
                before: str(first.before),
                after: str(first.after),
                perturbation: str(first.perturbation),
                image_metrics: image_summary(job, first),
                mimic_clean: None,  # the earlier job's check
                mimic_protected: None,
                check_html: "",
            }

        outputs = [
            job_state,
            device_info,
            progress_html,
            table,
            downloads,
            zip_button,
            chosen,
            before,
            after,
            perturbation,
            image_metrics,
            mimic_clean,
            mimic_protected,
            check_html,
        ]
        protect_button.click(
            arm, None, progress_html, concurrency_limit=None, show_progress="hidden"
        ).then(
            run_protect,
            page_inputs,
            outputs,
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress="minimal",
            show_progress_on=[progress_html],
        ).failure(lambda: message_html(NOT_STARTED, "error", "ms-not-started"), None, progress_html)

        def on_cancel(request: gr.Request):
            """A job waiting behind another tab's would hear nothing until that one ends; a
            running job's progress says "Cancelling" at its next update."""
            if service.cancel(request.session_hash):
                return message_html("Cancelled: your job will not run.", "warning", "ms-cancelled")
            return gr.update()

        cancel_button.click(on_cancel, None, progress_html, **quick)

        # -- one image: before / after / perturbation

        def on_choose(job: Job | None, name: str | None):
            image = job.image(name) if job else None
            if image is None:
                return None, None, None, "", None, None, ""
            paths = (str(image.before), str(image.after), str(image.perturbation))
            return (*paths, image_summary(job, image), None, None, "")

        chosen.input(
            on_choose,
            [job_state, chosen],
            [before, after, perturbation, image_metrics, mimic_clean, mimic_protected, check_html],
            concurrency_limit=None,
            show_progress="hidden",
        )

        # -- the check, queued with the protection jobs

        def run_check(job: Job | None, name: str | None, request: gr.Request):
            try:
                yield from check_updates(job, name, request.session_hash)
            finally:
                service.disarm(request.session_hash)

        def check_updates(job: Job | None, name: str | None, session: str):
            if job is None or job.image(name) is None:
                yield message_html("Protect an image first, then check it.", "error"), None, None
                return

            def work(progress: JobProgress) -> CheckResult:
                return service.check(session, job, name, progress)

            for progress, worker in run_beside(service, session, work):
                if worker.is_alive():
                    yield render_progress(progress), gr.update(), gr.update()
            if worker.error is not None:
                if isinstance(worker.error, JobCancelled):
                    yield message_html("Check cancelled.", "warning"), None, None
                else:
                    text = f"Check failed: {_one_line(worker.error)}"
                    yield message_html(text, "error"), None, None
                return
            result: CheckResult = worker.result
            yield (
                check_summary(result),
                str(result.clean_mimicry),
                str(result.protected_mimicry),
            )

        check_button.click(
            arm, None, check_html, concurrency_limit=None, show_progress="hidden"
        ).then(
            run_check,
            [job_state, chosen],
            [check_html, mimic_clean, mimic_protected],
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress="minimal",
            show_progress_on=[check_html],
        ).failure(lambda: message_html(NOT_STARTED, "error", "ms-not-started"), None, check_html)

        def on_unload(request: gr.Request):
            service.end_session(request.session_hash)

        demo.unload(on_unload)
    demo.queue(default_concurrency_limit=1)
    return demo


# shown where "Starting…" would otherwise stay when Gradio refuses an event before it runs
NOT_STARTED = (
    "Not started: the app could not take what the page sent; the message in the corner of the "
    "page says why."
)


def job_summary(job: Job, problems: Sequence[str] = ()) -> tuple[list[str], str]:
    """The lines that end a job, and their kind. The first line says how it ended: "Done" only
    when every image was protected; the time is the job's, not how long files are kept."""
    protected, failed = len(job.protected), [i for i in job.images if i.status == "failed"]
    took = format_seconds(job.seconds)
    if job.cancelled:
        first = f"Cancelled: {protected} image(s) were protected before you cancelled ({took})."
        first += " They are ready to download below."
    elif failed and not protected:
        first = f"Failed: none of the {len(failed)} image(s) could be protected."
    elif failed:
        first = f"Finished with errors: {protected} protected, {len(failed)} failed ({took})."
    else:
        first = f"Done: {protected} protected in {took}."
    lines = [first] + [i.error for i in failed if i.error] + list(problems)
    if failed and not protected:
        return lines, "error"
    return lines, "warning" if failed or job.cancelled or problems else "ok"


def upload_summary(names: Sequence[str], problems: Sequence[str]) -> str:
    """The message under the upload box: the images ready, and one line per file left out."""
    parts = []
    if names:
        ok = f"{len(names)} image(s) ready: " + ", ".join(names)
        parts.append(message_html(ok, "ok", "ms-upload-ok"))
    if problems:
        parts.append(messages_html(problems, "error", "ms-upload-errors"))
    return "".join(parts)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# --- serving ---------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


@dataclass
class RunningApp:
    """A launched app: its URL, and :meth:`close` to stop it and remove its files."""

    url: str
    demo: object
    service: ProtectionService
    _previous_temp: str | None = None

    def close(self) -> None:
        try:
            self.demo.close()
        finally:
            self.service.close()
            _restore_env("GRADIO_TEMP_DIR", self._previous_temp)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _private_launch_options() -> dict:
    """Gradio 6 keeps a run history (inputs and outputs) in the browser: not for private art."""
    import inspect

    import gradio as gr

    parameters = inspect.signature(gr.Blocks.launch).parameters
    return {"run_history": False} if "run_history" in parameters else {}


def launch(
    service: ProtectionService,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    open_browser: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> RunningApp:
    """Serve the page. ``block=False`` returns at once (tests); otherwise it returns on Ctrl-C.

    Gradio's upload cache is pointed into the service's folder (``GRADIO_TEMP_DIR``), so
    :meth:`RunningApp.close` removes uploads too; ``max_file_size`` makes Gradio refuse
    oversized uploads before they are written.
    """
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(service.cache_dir)
    running = None
    try:
        demo = build_app(service)
        try:
            _, url, _ = demo.launch(
                server_name=host,
                server_port=port,
                share=share,
                inbrowser=open_browser,
                prevent_thread_lock=True,
                max_file_size=service.limits.max_file_bytes,
                allowed_paths=[str(service.work_root)],
                show_error=False,
                quiet=quiet,
                ssr_mode=False,
                **_private_launch_options(),
            )
        except OSError as error:  # Gradio's advice names its own environment variables
            where = f"port {port}" if port else "a free port from 7860"
            reason = _one_line(error).split(". ")[0]  # not its advice, which is for Python
            raise OSError(
                f"Cannot listen on {host}, {where} ({reason}); choose another with --port."
            ) from None
        running = RunningApp(url or f"http://{host}:{demo.server_port}/", demo, service, previous)
        threading.Thread(target=service.preload, daemon=True, name="mimicshield-preload").start()
        if block:
            demo.block_thread()
    finally:
        if running is None:
            service.close()
            _restore_env("GRADIO_TEMP_DIR", previous)
        elif block:
            running.close()
    return running
