"""Protecting files: collecting inputs, batching by size, saving, and the run manifest.

The engine (:class:`~mimicshield.protector.Protector`) only sees tensors; this module is the
edge that turns paths into tensors and results into files. It never raises on a bad image:
the failure is recorded and the batch goes on.
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .images import IMAGE_SUFFIXES, ImageFileError, LoadedImage, load_image, save_atomically, to_pil
from .metrics import psnr, ssim
from .protector import Protector

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class InputFile:
    """A file to protect, and its path relative to the folder it came from (mirrored in OUT)."""

    path: Path
    relative: Path


@dataclass
class FileResult:
    input: str
    output: str | None
    status: str  # "protected", "skipped" or "failed"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    linf_255: float | None = None
    seconds: float | None = None


@dataclass
class RunReport:
    results: list[FileResult] = field(default_factory=list)

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]


def collect_inputs(arguments: Iterable[str]) -> tuple[list[InputFile], list[FileResult]]:
    """Expand files, folders (recursively) and glob patterns into image files.

    Returns the files found, and a failed result for each argument that matched nothing.
    """
    found: dict[Path, InputFile] = {}
    missing: list[FileResult] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                    found.setdefault(file.resolve(), InputFile(file, file.relative_to(path)))
        elif path.is_file():
            found.setdefault(path.resolve(), InputFile(path, Path(path.name)))
        elif matches := sorted(glob.glob(argument, recursive=True)):
            for match in map(Path, matches):
                if match.is_file():
                    found.setdefault(match.resolve(), InputFile(match, Path(match.name)))
        else:
            missing.append(FileResult(argument, None, "failed", f"{argument}: no such file."))
    return list(found.values()), missing


def output_path_for(item: InputFile, out_dir: Path) -> Path:
    """OUT/<relative path>.png: names kept, folders mirrored, always lossless PNG."""
    return out_dir / item.relative.with_suffix(".png")


def load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_manifest(out_dir: Path, header: dict, report: RunReport) -> Path:
    """OUT/manifest.json: version, model, method, parameters, seed and per-image results."""
    manifest = {
        "mimicshield_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **header,
        "images": [asdict(r) for r in report.results],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    temporary = path.with_suffix(".json.part")
    temporary.write_text(json.dumps(manifest, indent=2))
    temporary.replace(path)
    return path


def protect_files(
    files: list[InputFile],
    out_dir: Path,
    protector: Protector,
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    manifest_header: dict | None = None,
    on_image_start: Callable[[InputFile, int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_image_done: Callable[[FileResult], None] | None = None,
) -> RunReport:
    """Protect ``files`` into ``out_dir``, grouping same-size images into batches.

    Completed outputs recorded in an earlier manifest are skipped unless ``overwrite``. The
    manifest is rewritten after every image, so an interrupted run resumes where it stopped.
    """
    report = RunReport()

    def record(result: FileResult) -> None:
        report.results.append(result)
        if manifest_header is not None:
            write_manifest(out_dir, manifest_header, report)
        if on_image_done is not None:
            on_image_done(result)

    previous = {
        entry["output"]: entry
        for entry in load_manifest(out_dir).get("images", [])
        if entry.get("status") in ("protected", "skipped") and entry.get("output")
    }
    inputs = {item.path.resolve() for item in files}

    pending: list[tuple[InputFile, LoadedImage, Path]] = []
    for item in files:
        destination = output_path_for(item, out_dir)
        if destination.resolve() in inputs:
            error = f"{item.path}: output {destination} would overwrite an input; choose another -o."
            record(FileResult(str(item.path), None, "failed", error))
            continue
        if not overwrite and str(destination) in previous and destination.is_file():
            kept = {**previous[str(destination)], "status": "skipped", "input": str(item.path)}
            record(FileResult(**kept))
            continue
        try:
            loaded = load_image(item.path)
        except ImageFileError as error:
            record(FileResult(str(item.path), None, "failed", str(error)))
            continue
        pending.append((item, loaded, destination))

    by_size: dict[tuple[int, int], list] = {}
    for entry in pending:
        by_size.setdefault(entry[1].size, []).append(entry)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            for result in _protect_batch(batch, protector, on_image_start, on_step):
                record(result)
    return report


def _protect_batch(batch, protector: Protector, on_image_start, on_step) -> list[FileResult]:
    if on_image_start is not None:
        on_image_start(batch[0][0], len(batch))
    started = time.perf_counter()
    clean = torch.stack([loaded.rgb for _, loaded, _ in batch])
    output = protector.protect(clean, callback=on_step)
    seconds = (time.perf_counter() - started) / len(batch)
    quality_psnr, quality_ssim = psnr(output.images, clean), ssim(output.images, clean)

    results = []
    for i, (item, loaded, destination) in enumerate(batch):
        try:
            save_atomically(to_pil(output.images[i], loaded.alpha), destination)
        except OSError as error:
            message = f"{item.path}: could not write {destination} ({error})."
            results.append(FileResult(str(item.path), None, "failed", message))
            continue
        results.append(
            FileResult(
                input=str(item.path),
                output=str(destination),
                status="protected",
                width=loaded.size[0],
                height=loaded.size[1],
                psnr=float(quality_psnr[i]),
                ssim=float(quality_ssim[i]),
                linf_255=float(output.linf_255[i]),
                seconds=round(seconds, 3),
            )
        )
    return results
