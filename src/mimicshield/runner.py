"""Protecting files: collecting inputs, batching by working size, saving, and the run manifest.

The engine (:class:`~mimicshield.protector.Protector`) only sees tensors; this module is the
edge that turns paths into tensors and results into files. It never raises on a bad image:
the failure is recorded with one line naming the file, and the batch goes on.

Resuming: ``OUT/manifest.json`` is rewritten after every image, and every output is written
atomically, so after Ctrl-C or a crash the same command continues where it stopped. An output
counts as complete only if the manifest records it with the same settings and the same input
and output bytes (sha256); anything else is redone with ``overwrite`` or refused without it.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import numbers
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image
from torch import Tensor

from . import __version__
from .attack import quantize_within_budget
from .defaults import DEFAULT_TILE_SIZE, DEFAULT_WORK_SIZE
from .ensemble import members
from .images import (
    IMAGE_SUFFIXES,
    ImageFileError,
    ImageHeader,
    LoadedImage,
    OutputPlan,
    is_read_only,
    load_image,
    plan_output,
    probe_image,
    remove_partial_files,
    save_image,
    to_array,
    write_text_atomically,
)
from .metrics import json_number, linf_255, number_from_json, psnr, ssim
from .performance import release_cached_memory
from .protector import Protector
from .resolution import (
    padded_shape,
    protect_at_work_size,
    work_shape,
)

MANIFEST_NAME = "manifest.json"
# held by the run writing the folder; hidden, so folder scans skip it as they skip dotfiles
LOCK_NAME = ".mimicshield.lock"
PURIFY_RECORD_NAME = "purify.json"


@dataclass(frozen=True)
class InputFile:
    """A file to protect, and its path relative to the folder it came from (mirrored in OUT)."""

    path: Path
    relative: Path


@dataclass(frozen=True)
class OutputOptions:
    """How files are protected and written; a resumed run must use the same ones to skip."""

    work_size: int | None = DEFAULT_WORK_SIZE  # None: native resolution
    tile_size: int = DEFAULT_TILE_SIZE
    file_format: str = "png"  # "png" or "jpeg"
    quality: int = 95  # JPEG only
    provenance: bool = True  # write the "no AI/ML training" XMP
    strip_metadata: bool = False  # drop the input's EXIF (GPS too), XMP and text; keep the ICC


@dataclass
class FileResult:
    input: str
    output: str | None  # relative to the output folder
    status: str  # "protected", "skipped" or "failed"
    error: str | None = None
    relative: str | None = None
    width: int | None = None
    height: int | None = None
    bits: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    linf_255: float | None = None
    seconds: float | None = None
    note: str | None = None
    settings: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None

    @classmethod
    def from_dict(cls, entry: dict) -> FileResult:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in names}
        for name in ("psnr", "ssim", "linf_255", "seconds"):  # written by json_number
            if name in values:
                values[name] = number_from_json(values[name])
        return cls(**values)


@dataclass
class RunReport:
    results: list[FileResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said after the results, not failures

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]


@dataclass
class _Job:
    item: InputFile
    header: ImageHeader
    plan: OutputPlan
    destination: Path
    output: str


@dataclass(frozen=True)
class _Hooks:
    """The callbacks of :func:`protect_files` that follow one batch: started, each step, and
    each image's saving (quantizing, writing, measuring) once the steps are done."""

    image_start: Callable[[InputFile, int], None] | None = None
    step: Callable[[int, int], None] | None = None
    saving: Callable[[InputFile], None] | None = None


@dataclass
class InputScan:
    """What the input arguments hold: the image files, a failure for each argument (or file
    found) that cannot be read, and notes on what was left out on purpose."""

    files: list[InputFile] = field(default_factory=list)
    missing: list[FileResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# The records an earlier run leaves in its output folder (protect and evaluate's purified
# folders: manifest.json; purify: purify.json; mimic: mimic.json; evaluate: metrics.json). A
# folder holding one is skipped when a folder above it is read: a rerun must not take its own
# outputs for inputs.
RUN_RECORDS = (MANIFEST_NAME, PURIFY_RECORD_NAME, "mimic.json", "metrics.json")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the record of an earlier mimicshield run (see RUN_RECORDS)."""
    for name in RUN_RECORDS:
        record = folder / name
        if not record.is_file():
            continue
        try:
            content = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours: a user's file of the same name
        # evaluate's purified folders predate the version key: their record names the purification
        if isinstance(content, dict) and (
            "mimicshield_version" in content or "purification" in content
        ):
            return True
    return False


@dataclass
class FolderScan:
    """One folder's images, walked recursively, and what the walk left out and why."""

    images: list[Path] = field(default_factory=list)
    broken_links: list[Path] = field(default_factory=list)  # with an image suffix
    other_types: dict[str, int] = field(default_factory=dict)  # suffix -> files skipped
    run_folders: list[Path] = field(default_factory=list)  # outputs of earlier runs, skipped


def scan_folder(folder: Path, exclude: Iterable[Path] = ()) -> FolderScan:
    """The images below ``folder``, without hidden files and folders, the folders in
    ``exclude`` (this run's output folder), and the subfolders of earlier runs.

    Symbolic links to folders are not followed (as ``Path.rglob`` does not): a link to a
    parent would make the walk endless.
    """
    excluded = {Path(path).expanduser().resolve() for path in exclude}
    found = FolderScan()
    for root, folders, names in os.walk(folder):
        here = Path(root)
        kept = []
        for name in sorted(folders):
            sub = here / name
            if name.startswith(".") or sub.resolve() in excluded:
                continue
            if is_run_folder(sub):
                found.run_folders.append(sub)
                continue
            kept.append(name)
        folders[:] = kept  # os.walk descends only into these
        for name in names:
            path = here / name
            suffix = path.suffix.lower()
            if name.startswith(".") or (here == Path(folder) and name in RUN_RECORDS):
                continue
            if suffix not in IMAGE_SUFFIXES:
                kind = suffix or "(no suffix)"
                found.other_types[kind] = found.other_types.get(kind, 0) + 1
            elif path.is_file():
                found.images.append(path)
            elif path.is_symlink() and not path.exists():
                found.broken_links.append(path)
    found.images.sort()
    found.broken_links.sort()
    found.run_folders.sort()
    return found


def scan_inputs(arguments: Iterable[str], exclude: Path | None = None) -> InputScan:
    """Expand files, folders (recursively) and glob patterns into image files.

    A file's output name (``InputFile.relative``) is its path below the folder named, or below
    a pattern's literal part (``shots`` for ``shots/**/*.jpg``), so outputs mirror the inputs'
    folders; a file named directly keeps its name.

    Files under ``exclude`` (the output folder) are left out when it lies inside a folder or
    pattern being read, so a rerun into ``photos/protected`` does not protect its own outputs;
    so are subfolders holding an earlier run's record (``photos/protected-eps8``), with a note.
    An argument that names nothing readable (no such path, a broken symbolic link, a folder
    without images) is a failure: the run goes on without it and exits with status 1.
    """
    excluded = exclude.expanduser().resolve() if exclude is not None else None

    def wanted(file: Path, root: Path) -> bool:
        """Not in the output folder, unless the user pointed at that folder itself."""
        if excluded is None or root.resolve().is_relative_to(excluded):
            return True
        return not file.resolve().is_relative_to(excluded)

    found: dict[Path, InputFile] = {}
    scan = InputScan()

    def fail(argument: str, problem: str) -> None:
        scan.missing.append(FileResult(argument, None, "failed", f"{argument}: {problem}."))

    def add(item: InputFile) -> None:
        """One input per file on disk: a link to a file also given is protected once, under
        the real file's name where one of the two is a link, and a note says so."""
        key = item.path.resolve()
        kept = found.setdefault(key, item)
        if kept.path == item.path:
            return
        if kept.path.is_symlink() and not item.path.is_symlink():
            found[key], item, kept = item, kept, item
        scan.notes.append(
            f"{item.path} is the same file as {kept.path}: protected once, as {kept.path}."
        )

    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            inside = _excluded_below(path, excluded)
            folder = scan_folder(path, exclude=[] if inside is None else [inside])
            images = [file for file in folder.images if wanted(file, path)]
            for file in images:
                add(InputFile(file, file.relative_to(path)))
            for link in folder.broken_links:
                fail(str(link), _broken_link(link))
            scan.notes.extend(_folder_notes(argument, folder))
            if not images and not folder.broken_links:
                fail(argument, "no images in this folder" + _why_empty(folder))
        elif path.is_file():
            add(_as_input_file(path))
        elif path.is_symlink():  # a link whose target is gone (or a link to itself)
            fail(argument, _broken_link(path))
        elif matches := sorted(glob.glob(str(path), recursive=True)):
            root = Path(*itertools.takewhile(_is_literal, path.parts))  # the part before * or ?
            for match in map(Path, matches):
                if match.is_file() and wanted(match, root):
                    add(InputFile(match, match.relative_to(root)))
                elif match.is_symlink() and not match.exists():
                    fail(str(match), _broken_link(match))
        else:
            fail(argument, _nothing_there(argument))
    scan.files = list(found.values())
    return scan


def _nothing_there(argument: str) -> str:
    """What an argument naming nothing is: a pattern with no match is not a missing file, and
    a yes/no word after a flag (``--low-memory true``: typer's help shows ``<bool>`` beside
    flags) is a value the flag does not take."""
    if glob.has_magic(argument):
        return "the pattern matches no file"
    if argument.lower() in _FLAG_WORDS:
        return "no such file (flags take no value: write --low-memory, not --low-memory true)"
    return "no such file"


_FLAG_WORDS = {"true", "false", "yes", "no", "on", "off"}


def write_problem(error: OSError, destination: Path) -> str:
    """Why ``destination`` could not be written, as a user reads it: a file where one of its
    folders should be (``[Errno 17] File exists`` says nothing useful), else the OS's words."""
    blocked = next(
        (f for f in reversed(destination.parents) if f.exists() and not f.is_dir()), None
    )
    if blocked is not None:
        return f"{blocked} is a file, where a folder would go"
    return error.strerror or str(error)


def collect_inputs(
    arguments: Iterable[str], exclude: Path | None = None
) -> tuple[list[InputFile], list[FileResult]]:
    """:func:`scan_inputs` without its notes: the files found, and a failure for each argument
    (or file found) that cannot be read."""
    scan = scan_inputs(arguments, exclude)
    return scan.files, scan.missing


def _excluded_below(folder: Path, excluded: Path | None) -> Path | None:
    """``excluded`` when it lies strictly inside ``folder`` (then it is pruned from the walk)."""
    if excluded is None or folder.resolve().is_relative_to(excluded):
        return None
    return excluded if excluded.is_relative_to(folder.resolve()) else None


def _broken_link(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return "broken symbolic link"
    return f"broken symbolic link (to {target}, which does not exist or loops)"


def _describe_types(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    kinds = ", ".join(sorted(counts)[:4]) + (", ..." if len(counts) > 4 else "")
    return f"{total} file(s) of other types ({kinds})"


def _folder_notes(argument: str, folder: FolderScan) -> list[str]:
    """What the walk of one named folder skipped on purpose, said once per folder."""
    notes = []
    if folder.run_folders:
        shown = ", ".join(str(path) for path in folder.run_folders[:3])
        more = ", ..." if len(folder.run_folders) > 3 else ""
        notes.append(
            f"{argument}: skipped {len(folder.run_folders)} folder(s) written by earlier "
            f"mimicshield runs ({shown}{more}); name one to read it."
        )
    if folder.other_types and folder.images:
        supported = ", ".join(sorted(IMAGE_SUFFIXES))
        notes.append(
            f"{argument}: skipped {_describe_types(folder.other_types)}; supported: {supported}."
        )
    return notes


def _why_empty(folder: FolderScan) -> str:
    """For a folder without images: what it holds instead, if anything."""
    reasons = []
    if folder.other_types:
        reasons.append(f"only {_describe_types(folder.other_types)}")
    if folder.run_folders:
        reasons.append(f"{len(folder.run_folders)} folder(s) of earlier runs skipped")
    return f" ({'; '.join(reasons)})" if reasons else ""


def output_folder_problem(arguments: Iterable[str | Path], out: Path) -> str | None:
    """Why ``out`` cannot be the output folder of these inputs, or None: it is one of the input
    folders, the folder of a file named or a pattern's folder (outputs would land among the
    originals and be read as inputs by the next run), a broken symbolic link, or it cannot be
    created or written (said now, not after the model has loaded)."""
    target = Path(out).expanduser().resolve()
    for argument in arguments:
        folder, kind = _input_folder(Path(argument).expanduser())
        if folder is not None and folder.resolve() == target:
            return (
                f"-o {out} is {kind} {argument}; outputs would be written among the originals: "
                f"choose another folder (one inside it, such as {folder / 'protected'}, is fine)."
            )
    link = Path(out).expanduser()
    if link.is_symlink() and not link.exists():
        return f"-o {out}: {_broken_link(link)}; remove the link or choose another folder."
    if target.exists() and not target.is_dir():
        return f"-o {out}: exists and is not a folder; give a folder for the outputs."
    # the folder is made only when there is something to write: try its nearest existing
    # parent, where it will be made
    existing = next(folder for folder in (target, *target.parents) if folder.exists())
    if not existing.is_dir():
        return f"-o {out}: cannot write there ({existing} is a file)."
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"-o {out}: cannot write there ({error.strerror or error})."
    return None


def _input_folder(path: Path) -> tuple[Path | None, str]:
    """The folder an input argument reads from: itself, a file's folder, or a pattern's
    literal part; with how to name it in a message."""
    if path.is_dir():
        return path, "the input folder"
    if path.is_file():
        return path.parent, "the folder of the input"
    if glob.has_magic(str(path)):
        return Path(*itertools.takewhile(_is_literal, path.parts)), "the folder of the pattern"
    return None, ""


def no_inputs_message(arguments: Iterable[str], missing: list[FileResult]) -> str:
    """Why a run has nothing to do: the paths that do not exist, else no images in them."""
    if missing:
        return " ".join(result.error for result in missing if result.error)
    return f"No image files found in: {' '.join(arguments)}."


def _is_literal(part: str) -> bool:
    return not glob.has_magic(part)


class OutputClaims:
    """The output paths one run hands out: never onto an input, never one path twice.

    ``protect``, ``purify`` and ``mimic`` ask it before writing, so two inputs with one output
    name (``a.jpg`` and ``a.png``) or an ``-o`` that leads back onto the inputs refuse a file
    with a message instead of overwriting one.
    """

    def __init__(self, inputs: Iterable[Path]) -> None:
        self.inputs = {Path(path).resolve() for path in inputs}
        self.claimed: dict[Path, Path] = {}

    def refusal(self, source: Path, *destinations: Path) -> str | None:
        """Why ``source`` may not write one of ``destinations``, or None when it may write all."""
        for destination in destinations:
            resolved = destination.resolve()
            if resolved in self.inputs:
                return (
                    f"{source}: its output {destination} would overwrite an input; "
                    "choose another -o."
                )
            if resolved in self.claimed:
                return (
                    f"{source}: same output name {destination} as {self.claimed[resolved]}; "
                    "rename one."
                )
        return None

    def claim(self, source: Path, *destinations: Path) -> None:
        for destination in destinations:
            self.claimed[destination.resolve()] = source


def existing_outputs_error(destinations: Iterable[Path], out_dir: Path) -> str | None:
    """For commands without a manifest to resume from (``purify``, ``mimic``): a message when
    any destination exists already, since overwriting it could lose a file of the user's."""
    existing = [path for path in destinations if path.exists()]
    if not existing:
        return None
    return (
        f"-o {out_dir}: {len(existing)} output(s) exist already (first: {existing[0]}); "
        "pass --overwrite to replace them, or choose another -o."
    )


def load_manifest(out_dir: Path) -> dict:
    return load_record(Path(out_dir) / MANIFEST_NAME)


def load_record(path: Path) -> dict:
    """A run's JSON record as a dict; {} when it is absent, unreadable or not a JSON object."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class RecordError(ValueError):
    """A run record in the output folder that must not be rewritten: not ours, or read-only."""


class ForeignManifestError(RecordError):
    """``OUT/manifest.json`` exists but is not ours: rewriting it would lose the user's file."""


def check_manifest(out_dir: Path) -> None:
    """Raise :class:`RecordError` unless ``OUT/manifest.json`` is absent or ours to rewrite.

    Ours means a JSON object with ``mimicshield_version``, as :meth:`Manifest.write` writes
    it (atomically, so a crash never leaves a half-written one), and not made read-only.
    """
    check_record(Path(out_dir) / MANIFEST_NAME)


def check_record(path: Path) -> None:
    """Raise :class:`RecordError` unless the record at ``path`` is absent, or ours and writable.

    Said before a run starts: the record is rewritten after every file."""
    if not path.exists():
        return
    out_dir = path.parent
    if "mimicshield_version" not in load_record(path):
        raise ForeignManifestError(
            f"-o {out_dir}: {path.name} there was not written by mimicshield and would be "
            "overwritten; move it or choose another -o."
        )
    if is_read_only(path):
        raise RecordError(
            f"-o {out_dir}: {path} is read-only; not replaced (make it writable, or choose "
            "another -o)."
        )


def write_record(path: Path, record: dict) -> None:
    """Write a run's record atomically, as strict JSON (which jq and browsers read: PSNR is
    +inf for an unchanged image), marked with the version that wrote it."""
    content = {
        "mimicshield_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    text = json.dumps(_strict_json(content), indent=2, allow_nan=False)
    write_text_atomically(path, text)


class OutputBusyError(RecordError):
    """Another mimicshield run holds the output folder's lock (see :func:`output_lock`)."""


class LockFileError(OutputBusyError):
    """The output folder's lock file cannot be made (a folder not ours to write): refused as
    a busy folder is, with one line saying what to do."""


_held = threading.local()  # the output folders this thread holds: taking one again is a no-op


@contextmanager
def output_lock(out_dir: Path | str) -> Iterator[None]:
    """Hold ``OUT/.mimicshield.lock`` while a run writes ``out_dir``.

    Two runs into one folder would each rewrite its record from what they read at the start,
    and the last would drop the other's files: the second is refused at once
    (:class:`OutputBusyError`), touching nothing. Re-entrant in a thread: the CLI takes it
    before the model loads, and :func:`protect_files` takes it again. The OS lock dies with
    its process, so a file left by a killed run does not block. The folders made only for
    the lock (``out_dir`` and missing parents) are removed again when nothing was written
    there (runs make them only to write). A lock file that cannot be made raises
    :class:`LockFileError`.
    """
    folder = Path(out_dir).expanduser().resolve()
    held: set[Path] = _held.__dict__.setdefault("folders", set())
    if folder in held:
        yield
        return
    made = _first_missing(folder)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise OutputBusyError(_busy_message(out_dir)) from None
    except OSError as error:  # not writable: another user's lock file, a read-only folder
        _remove_unused(folder, made)
        raise LockFileError(_lock_file_problem(out_dir, error)) from None
    if not lock.lock_file or not Path(lock.lock_file).exists():  # removed by the run before
        lock.release()
        raise OutputBusyError(_busy_message(out_dir))
    held.add(folder)
    try:
        yield
    finally:
        held.discard(folder)
        _release(lock, folder, made)


def _busy_message(out_dir: Path | str) -> str:
    return (
        f"{out_dir} is being written by another mimicshield run (lock file "
        f"{Path(out_dir) / LOCK_NAME}); wait for it to finish."
    )


def _lock_file_problem(out_dir: Path | str, error: OSError) -> str:
    lock_file = Path(out_dir) / LOCK_NAME
    reason = write_problem(error, lock_file)
    if reason == error.strerror:
        reason = reason.lower()  # "permission denied", in the middle of the line
    return (
        f"{out_dir}: cannot create the lock file {lock_file} ({reason}); choose an output "
        "folder you can write to."
    )


def _first_missing(folder: Path) -> Path | None:
    """The topmost of ``folder`` and its parents that does not exist yet: the first folder
    ``mkdir(parents=True)`` makes. None when ``folder`` exists."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _release(lock: FileLock, folder: Path, made: Path | None) -> None:
    """Release the lock, removing the folders made only for it. Removed while still held
    where the OS allows it (POSIX), so no other run can have taken the file being removed;
    tried again once released, as Windows cannot remove an open file (nor another run's)."""
    _remove_unused(folder, made)
    lock.release()
    _remove_unused(folder, made)


def _remove_unused(folder: Path, made: Path | None) -> None:
    """Best effort: remove ``folder`` and its parents up to ``made`` (the first one made for
    the lock), each only if it holds nothing but the lock file. None: nothing was made."""
    if made is None:
        return
    with suppress(OSError):
        if any(path.name != LOCK_NAME for path in folder.iterdir()):
            return
        (folder / LOCK_NAME).unlink(missing_ok=True)
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except FileNotFoundError:  # not made yet (mkdir failed), or removed already
            pass
        except OSError:  # something written there
            return
        if path == made:
            return


class Manifest:
    """``OUT/manifest.json``: this run's header, and one entry per input (earlier runs kept).

    Entries are keyed by the input's path relative to its folder, which is also where its
    output lives, so a run over part of a folder keeps the entries of the rest.

    The top-level header describes the latest run. Outputs of earlier runs with other
    settings may remain beside it, so ``runs`` describes every run whose settings an entry
    still names: each entry's ``settings`` is the ``settings`` of one of them.
    """

    def __init__(self, out_dir: Path, header: dict | None) -> None:
        if header is not None:
            check_manifest(out_dir)
        self.out_dir = out_dir
        self.header = header
        self.entries: dict[str, dict] = {}
        earlier = load_manifest(out_dir)
        for entry in earlier.get("images", []):
            if isinstance(entry, dict) and entry.get("relative"):
                self.entries[entry["relative"]] = entry
        self.runs = _earlier_runs(earlier)
        if header is not None and header.get("settings"):
            self.runs.pop(header["settings"], None)  # described again, last, by this run
            self.runs[header["settings"]] = {"mimicshield_version": __version__, **header}

    def previous(self, relative: str) -> FileResult | None:
        entry = self.entries.get(relative)
        return FileResult.from_dict(entry) if entry else None

    def record(self, result: FileResult) -> None:
        """Keep ``result``; but a failure never replaces the entry of a finished output.

        Outputs are written atomically, so a failed attempt (refused, say, because the settings
        changed) left the earlier output as its entry describes it: keeping the entry lets the
        earlier command still resume.
        """
        if result.relative is None:
            return
        earlier = self.entries.get(result.relative, {})
        if result.status == "failed" and earlier.get("status") in ("protected", "skipped"):
            return
        self.entries[result.relative] = asdict(result)
        if self.header is not None:
            self.write()

    def settings_in_use(self) -> list[dict]:
        """The runs whose outputs the folder holds (their finished entries name their
        settings), oldest first: a run whose every file failed made nothing to describe."""
        named = {
            entry["settings"]
            for entry in self.entries.values()
            if _named(entry, "settings") and entry.get("status") in ("protected", "skipped")
        }
        return [run for key, run in self.runs.items() if key in named]

    def write(self) -> Path:
        path = self.out_dir / MANIFEST_NAME
        record = {**(self.header or {}), "runs": self.settings_in_use()}
        write_record(path, {**record, "images": list(self.entries.values())})
        return path


def _earlier_runs(manifest: dict) -> dict[str, dict]:
    """The runs an earlier manifest describes, by settings. One written before ``runs``
    existed describes its last run only, in its header: that run is taken from there."""
    runs = manifest.get("runs")
    if not isinstance(runs, list):  # written before ``runs`` existed
        header = {k: v for k, v in manifest.items() if k not in ("created", "images", "runs")}
        runs = [header] if manifest.get("settings") else []
    return {run["settings"]: run for run in runs if _named(run, "settings")}


class PurifyRecord:
    """``OUT/purify.json``: what ``purify`` wrote there, so later scans skip the folder.

    Entries are keyed by output (``jpeg75/a.png``) and name their input and the settings of
    the purification that made them; ``purifications`` describes each settings an entry
    names (a purification run again with another model is a second one), oldest first.
    Earlier runs' entries are kept, as the protect manifest keeps them. Rewritten atomically
    before the first output (:meth:`before_output`) and after each, as the protect manifest
    is, so that after a crash it names every complete output.
    """

    def __init__(self, out_dir: Path, purifications: list[dict]) -> None:
        self.path = Path(out_dir) / PURIFY_RECORD_NAME
        check_record(self.path)
        earlier = load_record(self.path)
        self.entries = {
            entry["output"]: entry
            for entry in _as_list(earlier.get("files"))
            if _named(entry, "output")
        }
        described = [*_as_list(earlier.get("purifications")), *map(_with_settings, purifications)]
        self.purifications = {p["settings"]: p for p in described if _named(p, "settings")}
        self.current = [_with_settings(p)["settings"] for p in purifications]
        self.written = False

    def settings(self, name: str) -> str:
        """The settings id of this run's purification ``name``."""
        return next(key for key in self.current if self.purifications[key]["name"] == name)

    def before_output(self) -> None:
        """Write the record before the first output, so the folder is marked as a run's even
        if the run is killed while writing it."""
        if not self.written:
            self.write()

    def add(self, source: Path, name: str, output: Path) -> None:
        """Record that ``source``'s purification ``name`` is complete at ``output``."""
        relative = output.relative_to(self.path.parent).as_posix()
        self.entries[relative] = {
            "input": str(source),
            "purification": name,
            "output": relative,
            "settings": self.settings(name),
        }
        self.write()

    def write(self) -> None:
        named = {e["settings"] for e in self.entries.values() if _named(e, "settings")}
        named.update(self.current)
        described = [p for key, p in self.purifications.items() if key in named]
        write_record(self.path, {"purifications": described, "files": list(self.entries.values())})
        self.written = True


def _named(item, key: str) -> bool:
    """Whether a record's ``item`` is an object whose ``key`` is a name (a string)."""
    return isinstance(item, dict) and isinstance(item.get(key), str) and bool(item[key])


def _as_list(value) -> list:
    """``value`` if a record holds a list there, else nothing (an edited or damaged record)."""
    return value if isinstance(value, list) else []


def _with_settings(purification: dict) -> dict:
    """``purification`` (name, parameters, ...) with ``settings``: a short fingerprint of its
    name and parameters, which the entries it made name."""
    if "settings" in purification:
        return purification
    key = {k: purification.get(k) for k in ("name", "parameters")}
    text = json.dumps(_strict_json(key), sort_keys=True, default=str)
    return {**purification, "settings": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _strict_json(value):
    """``value`` with every inf and NaN float written as :func:`json_number` writes it."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return json_number(value) if isinstance(value, float) else value


def default_output_options(protector: Protector) -> OutputOptions:
    """The CLI's defaults: the work size raised to the models' own size (1024 for SDXL)."""
    from .families import default_work_size

    model = getattr(protector, "model", None)
    sizes = [getattr(m, "native_size", None) for m, _ in members(model)] if model else []
    return OutputOptions(work_size=default_work_size(DEFAULT_WORK_SIZE, sizes))


def _as_input_file(item: InputFile | str | Path) -> InputFile:
    if isinstance(item, InputFile):
        return item
    path = Path(item).expanduser()
    return InputFile(path, Path(path.name))


def default_manifest_header(protector: Protector) -> dict:
    """What identifies a run made from Python: the models (a resumed run with another model
    must not skip), their weights, and the settings, with the target image's digest."""
    model = getattr(protector, "model", None)  # any engine with .config and .protect() will do
    models = [] if model is None else members(model)
    target = getattr(protector, "target", None)
    # no target recorded as the CLI records it, so that the CLI resumes this run's folder
    about_target = {"target": None}
    if target is not None:
        about_target = {"target_sha256": hashlib.sha256(target.numpy().tobytes()).hexdigest()}
    names = [model_id(getattr(model, "name", "") or type(model).__name__) for model, _ in models]
    return {
        "model": names[0] if len(names) == 1 else names,  # as the CLI records it
        "model_weights": [weight for _, weight in models],
        "parameters": {
            **protector.config.to_dict(),
            **about_target,
            "clip_skip": clip_skip_parameter([model for model, _ in models]),
        },
    }


def model_id(source: str) -> str:
    """A local model's absolute path (``tiny`` and ``./tiny/`` are one model, and resume);
    a hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _one_model(value):
    """A manifest's ``model``: one model as its name, whether recorded alone or in a list
    (as Python runs recorded it before they matched the CLI)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _same_runs(earlier: dict, header: dict, config: dict) -> list[str]:
    """The settings ids of the runs ``earlier`` describes whose settings are this run's
    ``header``, though recorded otherwise (:func:`_comparable`): a folder made from Python
    resumes from the CLI. Only when the header holds the whole protector ``config``, which
    the settings id covers besides it."""
    now = _comparable(header)
    if any(
        now["parameters"].get(key, object()) != value for key, value in _as_json(config).items()
    ):
        return []
    return [key for key, run in _earlier_runs(earlier).items() if _comparable(run) == now]


def _comparable(run: dict) -> dict:
    """What shapes a run's outputs, from its header, with what the CLI and Python recorded
    differently made one: the model alone or in a list (paths resolved), no target as
    ``target`` or ``target_sha256``, clip skip and ``strip_metadata`` at their defaults."""
    run = _as_json(run)
    model = _one_model(run.get("model"))
    model = [model_id(m) for m in model] if isinstance(model, list) else model
    model = model_id(model) if isinstance(model, str) else model
    parameters = _without_default_clip_skip(dict(run.get("parameters") or {}))
    if parameters.get("target") is None and parameters.get("target_sha256") is None:
        parameters.pop("target", None)
        parameters.pop("target_sha256", None)
    options = _without_later_defaults(dict(run.get("options") or {}))
    return {"model": model, "parameters": parameters, "options": options}


def _as_json(value):
    """``value`` as the manifest holds it (tuples as lists, inf as a string)."""
    return json.loads(json.dumps(_strict_json(value), default=str))


def clip_skip_parameter(models: Sequence) -> int | list[int]:
    """The manifest's ``clip_skip``: the model's, or one per model of an ensemble."""
    values = [int(getattr(model, "clip_skip", 1)) for model in models]
    return values[0] if len(values) == 1 else values


def _is_default_clip_skip(value) -> bool:
    """Clip skip 1 for every model: what runs made before clip skip existed did."""
    values = value if isinstance(value, list) else [value]
    return all(v == 1 for v in values)


def settings_changes(earlier: dict, header: dict, limit: int = 4) -> str:
    """The settings that differ between an earlier run's manifest header and this one's, as
    ``steps 2 -> 3, model 'a' -> 'b'``: what a refused resume should say."""

    def flat(values: dict) -> dict:
        out = {}
        for key in ("model", "model_weights", "family", "dtype"):
            if key in values:
                out[key] = values[key]
        if "model" in out:
            out["model"] = _one_model(out["model"])
        for group in ("parameters", "options"):
            for key, value in (values.get(group) or {}).items():
                out[key] = value
        if "parameters" in values and _is_default_clip_skip(out.get("clip_skip", 1)):
            out["clip_skip"] = 1  # also a manifest from before clip skip, and [1, 1]
        return out

    # this run's header as the manifest will hold it (tuples as lists, inf as a string)
    before, after = flat(earlier), flat(json.loads(json.dumps(_strict_json(header))))
    differ = [
        f"{key} {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and key in before and key in after
    ]
    more = f", and {len(differ) - limit} more" if len(differ) > limit else ""
    return ", ".join(differ[:limit]) + more


def settings_id(protector: Protector, options: OutputOptions, header: dict | None) -> str:
    """A short fingerprint of everything that shapes an output (not the device it ran on)."""
    header = header or {}
    parameters = header.get("parameters")
    if isinstance(parameters, dict):
        parameters = _without_default_clip_skip(parameters)
    settings = {
        "model": header.get("model"),
        "parameters": parameters,
        "config": protector.config.to_dict(),
        "options": _options_fingerprint(options),
    }
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _options_fingerprint(options: OutputOptions) -> dict:
    """The options that shape an output. Options added later count only when not at their
    default, so that runs made before they existed still resume (same fingerprint)."""
    return _without_later_defaults(asdict(options))


def _without_default_clip_skip(parameters: dict) -> dict:
    """``parameters`` without ``clip_skip`` at its default, so that runs made before it was
    recorded still resume."""
    if _is_default_clip_skip(parameters.get("clip_skip", 1)):
        return {k: v for k, v in parameters.items() if k != "clip_skip"}
    return parameters


def _without_later_defaults(options: dict) -> dict:
    """Output options without those added later (``strip_metadata``) at their default."""
    if not options.get("strip_metadata"):
        return {k: v for k, v in options.items() if k != "strip_metadata"}
    return options


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def protect_files(
    files: Iterable[InputFile | str | Path] | InputFile | str | Path,
    out_dir: Path,
    protector: Protector,
    *,
    options: OutputOptions | None = None,
    batch_size: int | Callable[[int, int], int] = 1,
    overwrite: bool = False,
    manifest_header: dict | None = None,
    on_image_start: Callable[[InputFile, int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_saving: Callable[[InputFile], None] | None = None,
    on_image_done: Callable[[FileResult], None] | None = None,
) -> RunReport:
    """Protect ``files`` into ``out_dir``, grouping images of equal working size into batches.

    ``batch_size`` is a number, or a function of the work shape (height, width) that picks one
    (``--batch-size auto``). A batch that runs out of device memory is split and retried.

    ``files`` are :func:`collect_inputs` results (which mirror folders into ``out_dir``) or
    paths, each written under its own name; one path or InputFile alone is one input.
    Completed outputs recorded in an earlier manifest (same settings, same bytes) are skipped
    unless ``overwrite``. ``OUT/manifest.json`` is rewritten after every image, so an
    interrupted run resumes where it stopped; its header is
    ``manifest_header`` (the CLI's: model, device, parameters), by default the models' names
    and the protector's settings. Temporary files a killed run left beside this run's outputs are
    removed before the first is written. ``on_saving`` is called as each protected image starts
    being quantized, saved and measured (seconds for a large image, after its last step).
    """
    # both checked before the lock, which creates out_dir: a wrong call writes nothing
    if isinstance(files, (str, Path, InputFile)):  # one input, not its characters
        files = [files]
    _check_batch_size(batch_size)
    with output_lock(out_dir):  # a second run into out_dir would drop this one's entries
        options = options or default_output_options(protector)
        out_dir = Path(out_dir)
        files = [_as_input_file(item) for item in files]
        if manifest_header is None:
            manifest_header = default_manifest_header(protector)
        settings = settings_id(protector, options, manifest_header)
        header = {**manifest_header, "settings": settings, "options": asdict(options)}
        earlier = load_manifest(out_dir)  # before this run rewrites it: what a refusal names
        changes = settings_changes(earlier, header) if earlier.get("settings") else ""
        # an earlier run's outputs count as this run's when its settings were the same
        accepted = {settings, *_same_runs(earlier, header, protector.config.to_dict())}
        manifest = Manifest(out_dir, header)
        report = RunReport()

        def record(result: FileResult) -> None:
            report.results.append(result)
            manifest.record(result)
            if on_image_done is not None:
                on_image_done(result)

        claims = OutputClaims(item.path for item in files)
        groups: dict[tuple[int, int], list[_Job]] = {}
        for item in files:
            relative = item.relative.as_posix()
            previous = manifest.previous(relative)
            if not overwrite and _is_complete(previous, item, out_dir, accepted):
                kept = {**asdict(previous), "status": "skipped", "input": str(item.path)}
                kept["settings"] = settings  # the same settings, as this run's header names them
                claims.claim(item.path, out_dir / previous.output)
                record(FileResult(**kept))
                continue
            try:
                changed = (
                    changes if previous and previous.settings == earlier.get("settings") else ""
                )
                job = _plan(item, out_dir, options, claims, overwrite, previous, accepted, changed)
            except ImageFileError as error:
                record(FileResult(str(item.path), None, "failed", str(error), relative=relative))
                continue
            claims.claim(item.path, job.destination)
            key = padded_shape(*work_shape(job.header.height, job.header.width, options.work_size))
            groups.setdefault(key, []).append(job)

        destinations = [job.destination for jobs in groups.values() for job in jobs]
        remove_partial_files([out_dir / MANIFEST_NAME, *destinations])
        hooks = _Hooks(on_image_start, on_step, on_saving)
        for shape, jobs in groups.items():
            size = batch_size(*shape) if callable(batch_size) else batch_size
            _check_batch_size(size)  # a picking function's answer too
            for start in range(0, len(jobs), size):
                batch = jobs[start : start + size]
                _protect_batch(batch, protector, options, settings, record, hooks)
        finished = [e for e in manifest.entries.values() if e.get("status") != "failed"]
        held = {entry["settings"] for entry in finished if _named(entry, "settings")}
        if len(held) > 1:
            report.notes.append(
                f"{out_dir} holds outputs made with {len(held)} different settings; "
                f'{MANIFEST_NAME} describes each under "runs", and names the one of each image.'
            )
        return report


def _check_batch_size(batch_size) -> None:
    """``batch_size`` is an int >= 1 or a function that picks one (the CLI's ``auto``): say so
    in one line, not as ``range()``'s "arg 3 must not be zero" after the manifest is written."""
    if callable(batch_size):
        return
    whole = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not whole or batch_size < 1:
        raise ValueError(
            "batch_size must be a whole number of at least 1, or a function of the work shape "
            f"(height, width) that picks one; got {batch_size!r}."
        )


def _is_complete(
    previous: FileResult | None, item: InputFile, out_dir: Path, accepted: Collection[str]
) -> bool:
    """Recorded as done with these settings (one of ``accepted``), and neither file has
    changed since."""
    if previous is None or previous.status not in ("protected", "skipped"):
        return False
    if previous.settings not in accepted or not previous.output:
        return False
    output = out_dir / previous.output
    if not output.is_file() or not item.path.is_file():
        return False
    return (
        sha256_file(output) == previous.output_sha256
        and sha256_file(item.path) == previous.input_sha256
    )


def _plan(
    item: InputFile,
    out_dir: Path,
    options: OutputOptions,
    claims: OutputClaims,
    overwrite: bool,
    previous: FileResult | None,
    accepted: Collection[str],
    changes: str = "",
) -> _Job:
    """Read the header and decide the output path; refuse anything that would lose a file.

    ``changes`` names the settings that differ from the run that made the existing output."""
    header = probe_image(item.path)
    plan = plan_output(header, options.file_format)
    output = item.relative.with_suffix(plan.suffix)
    destination = out_dir / output
    if (refusal := claims.refusal(item.path, destination)) is not None:
        raise ImageFileError(refusal)
    if overwrite and is_read_only(destination):
        raise ImageFileError(f"{item.path}: output {destination} is read-only; not replaced.")
    if destination.exists() and not overwrite:
        raise ImageFileError(
            f"{item.path}: output {destination} already exists and "
            f"{_why_not_resumed(previous, accepted, changes)}; pass --overwrite to replace it."
        )
    return _Job(item, header, plan, destination, output.as_posix())


def _why_not_resumed(previous: FileResult | None, accepted: Collection[str], changes: str) -> str:
    """Why an existing output is not taken as finished, for the refusal's message.

    A manifest without a finished entry for it (none, or the failure an earlier refusal
    recorded) most often means a run stopped between saving the output and rewriting the
    manifest: the output may be complete, but nothing vouches for it.
    """
    if previous is None or previous.status == "failed":
        return (
            "is not recorded in the manifest as finished (it may be a file of yours, or a run "
            "stopped between saving it and updating the manifest)"
        )
    if previous.settings is not None and previous.settings not in accepted:
        return "was protected with different settings" + (f" ({changes})" if changes else "")
    return "does not match the manifest (the input or the output changed since)"


def _protect_batch(
    batch: list[_Job],
    protector: Protector,
    options: OutputOptions,
    settings: str,
    record: Callable[[FileResult], None],
    hooks: _Hooks,
) -> None:
    loaded: list[tuple[_Job, LoadedImage]] = []
    for job in batch:
        try:
            loaded.append((job, load_image(job.item.path)))
        except ImageFileError as error:
            record(_failure(job, str(error)))
    if loaded:
        _protect_loaded(loaded, protector, options, settings, record, hooks)


def _protect_loaded(
    loaded: list[tuple[_Job, LoadedImage]],
    protector: Protector,
    options: OutputOptions,
    settings: str,
    record: Callable[[FileResult], None],
    hooks: _Hooks,
) -> None:
    """Protect and save decoded images; halves the batch while it runs out of device memory.

    Each image draws from its own generator, so a split batch protects every image as before.
    """
    if hooks.image_start is not None:
        hooks.image_start(loaded[0][0].item, len(loaded))
    started = time.perf_counter()
    try:
        protected = protect_at_work_size(
            protector,
            [image.rgb for _, image in loaded],
            work_size=options.work_size,
            tile_size=options.tile_size,
            batch_size=len(loaded),
            callback=hooks.step,
        )
    except torch.cuda.OutOfMemoryError as error:
        if len(loaded) == 1:
            _record_failures(loaded, error, record)
            return
        protected = None  # split below, once the error and its tensors are gone
    except (RuntimeError, ValueError, MemoryError) as error:
        _record_failures(loaded, error, record)
        return
    if protected is None:
        release_cached_memory()
        half = len(loaded) // 2
        for part in (loaded[:half], loaded[half:]):
            _protect_loaded(part, protector, options, settings, record, hooks)
        return
    seconds = (time.perf_counter() - started) / len(loaded)

    for (job, image), adversarial in zip(loaded, protected, strict=True):
        if hooks.saving is not None:
            hooks.saving(job.item)
        record(_save(job, image, adversarial, protector.config.eps, options, settings, seconds))


def _record_failures(loaded: list[tuple[_Job, LoadedImage]], error: Exception, record) -> None:
    hint = " (out of memory: try a smaller --tile-size)" if "memory" in str(error) else ""
    for job, _ in loaded:
        record(_failure(job, f"{job.item.path}: protection failed: {error}{hint}"))


def _save(
    job: _Job,
    image: LoadedImage,
    adversarial: Tensor,
    eps: float,
    options: OutputOptions,
    settings: str,
    seconds: float,
) -> FileResult:
    final = to_file_grid(adversarial, image.rgb, eps, job.plan.levels, image.grey)
    try:
        array = to_array(final, image, job.plan.levels)
        saving_notes = save_image(
            array,
            image,
            job.destination,
            job.plan,
            quality=options.quality,
            provenance=options.provenance,
            strip_metadata=options.strip_metadata,
        )
    except OSError as error:
        why = write_problem(error, job.destination)
        return _failure(job, f"{job.item.path}: could not write {job.destination} ({why}).")

    notes = [*image.notes, *([job.plan.note] if job.plan.note else []), *saving_notes]
    if job.plan.format == "JPEG":  # measure what the lossy file really holds
        final = _decode_saved(job.destination, image.grey)
    clean = image.rgb
    # float32 noise (2.000007) rounded off; 16-bit files step by 255/65535, so not to whole
    achieved = round(float(linf_255(final[None], clean[None])[0]), 4)
    if achieved == 0:  # "protected" alone would tell the user something untrue
        notes.append("no pixel changed (too small an image, or the perturbation rounded away)")
    return FileResult(
        input=str(job.item.path),
        output=job.output,
        status="protected",
        relative=job.item.relative.as_posix(),
        width=image.size[0],
        height=image.size[1],
        bits=8 if job.plan.levels == 255 else 16,
        psnr=float(psnr(final[None], clean[None])[0]),
        ssim=_defined(float(ssim(final[None], clean[None])[0])),
        linf_255=achieved,
        seconds=round(seconds, 3),
        note="; ".join(notes) or None,
        settings=settings,
        input_sha256=sha256_file(job.item.path),
        output_sha256=sha256_file(job.destination),
    )


def _defined(value: float) -> float | None:
    """NaN (a metric an image is too small for) as None, which the manifest writes as null."""
    return None if math.isnan(value) else value


def to_file_grid(adversarial: Tensor, clean: Tensor, eps: float, levels: int, grey: bool) -> Tensor:
    """Round to the file's ``levels`` within ``eps`` of ``clean``; grey images stay grey.

    Grey images come from the Protector with one perturbation for all three channels; the
    mean over channels is then that perturbation itself (and any average of values within eps
    is within eps), as the file stores a single channel.
    """
    if grey:
        delta = (adversarial - clean).mean(dim=0, keepdim=True)
        adversarial = (clean[:1] + delta).clamp(0, 1).expand_as(clean)
    return quantize_within_budget(adversarial, clean, eps, levels)


def _decode_saved(path: Path, grey: bool) -> Tensor:
    with Image.open(path) as saved:
        array = np.asarray(saved.convert("L" if grey else "RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(array)
    return tensor.expand(3, -1, -1) if grey else tensor.permute(2, 0, 1)


def _failure(job: _Job, message: str) -> FileResult:
    return FileResult(
        str(job.item.path), None, "failed", message, relative=job.item.relative.as_posix()
    )
