"""Uploads: what a browser tab may leave on this computer's disk, checked before anything runs.

A file is judged by its content (never its name), its size and its pixel count, decoded in full
when it arrives, and kept once however often it is uploaded; the byte limits of a tab and of the
whole app bound the disk that uploads take. Nothing here knows of Gradio or of models.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..images import ImageFileError, load_image, probe_image

# Pillow's names for the formats the CLI reads (MPO: the multi-picture JPEG of many phones).
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP"}
ALLOWED_FORMATS_TEXT = "PNG, JPEG, WebP, TIFF or BMP"


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
    """The bytes a tab's list of uploads may take: what is left of the tab's own limit (once
    its target image is counted), and what is left of the app's limit once the other tabs'
    uploads are counted. The limits themselves are in ``limits``, for the messages."""

    tab_bytes_left: int
    app_bytes_left: int
    limits: UploadLimits

    def refusal(self, name: str, total: int) -> str | None:
        """Why a file that brings the list to ``total`` bytes is left out, or None."""
        if total > self.tab_bytes_left:
            return (
                f"{name}: left out: this tab's uploads would pass "
                f"{_gigabytes(self.limits.tab_bytes)}, this app's limit per tab. Protect these "
                "first, then upload the rest."
            )
        if total > self.app_bytes_left:
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
    from ..runner import sha256_file

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


def _one_line(error: BaseException) -> str:
    """An error's first line, at most 300 characters: how every message of the app quotes one
    (here first, as uploads are the first to need it; the service and the page import it)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
