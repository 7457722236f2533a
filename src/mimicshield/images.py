"""Image files in and out: decoding every common mode, orientation, metadata and atomic saving.

I/O lives only here (and in :mod:`mimicshield.runner`, which calls it). An image is decoded to RGB
in [0, 1] for the engine plus everything needed to write it back the way the user made it: the
alpha channel untouched, the bit depth, whether it was grey, the ICC profile, EXIF, XMP and IPTC.

Choices, per input mode:

- ``RGB`` / ``RGBA``: protected as they are; the alpha channel is copied bit for bit.
- ``L`` / ``LA`` / ``1``: protected as grey replicated to RGB; one perturbation for all three
  channels, so the output stays grey (``1`` is saved as ``L``: a bilevel image cannot hold it).
- ``P`` / ``PA``: a perturbation does not fit a 256-colour palette, so these are protected and
  saved as RGB(A).
- ``CMYK``: converted to sRGB through its embedded ICC profile (relative colorimetric with
  black-point compensation, the usual choice for CMYK -> RGB), saved as RGB with an sRGB profile.
- ``I;16``, 16-bit RGB(A) PNG ("48/64-bit PNG") and 16-bit RGB(A) TIFF: kept at 16 bits; the
  budget is enforced on the 65535-level grid. Pillow reads 16-bit colour at 8 bits and cannot write
  it, so 16-bit colour PNGs are read and written with OpenCV (a 16-bit PNG out) and 16-bit colour
  TIFFs with ``tifffile`` (a lossless 16-bit TIFF out). 16-bit grey with alpha (``LA`` 16-bit
  PNG) is still read at 8 bits by Pillow, with a note.

Metadata: the ICC profile is always kept (the colours depend on it), and so are the dpi. EXIF
(orientation and thumbnail removed), XMP, IPTC-IIM and PNG text chunks are kept unless
``strip_metadata`` asks for a privacy clean-up; see :func:`save_image` for what each output format
can hold.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import re
import secrets
import stat
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from PIL.TiffImagePlugin import ImageFileDirectory_v2
from torch import Tensor

from .metadata import (
    IPTC_RAW_PROFILE,
    IRB_RAW_PROFILE,
    ORIENTATION,
    checked_iptc,
    clean_exif,
    insert_jpeg_segment,
    iptc_app13,
    iptc_from_app13,
    iptc_from_irb,
    iptc_from_raw_profile,
    iptc_raw_profile,
    merge_xmp,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
OUTPUT_FORMATS = ("png", "jpeg")
PARTIAL_SUFFIX = ".part"
PARTIAL_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.part")

GREY_MODES = {"1", "L", "LA", "La"}
SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "YCbCr", "P", "PA", "CMYK"}
ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
# PNG text chunks that are stale copies of metadata handled elsewhere (ImageMagick writes these).
# The IPTC one is read into ``LoadedImage.iptc`` and written back from it, never copied as text.
# "Raw profile type 8bim" (a Photoshop resource list: copyright flag, URL, ... and maybe the IPTC)
# is copied as it came; when it holds our IPTC no separate IPTC chunk is written (_png_info).
SKIPPED_PNG_TEXT = {
    "XML:com.adobe.xmp",
    "Raw profile type exif",
    "Raw profile type APP1",
    IPTC_RAW_PROFILE,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks copied from Pillow's metadata writer into a 16-bit PNG made by OpenCV (see _encode_png16).
PNG_METADATA_CHUNKS = {b"iCCP", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"eXIf"}
PNG_IMAGE_CHUNKS = {b"IHDR", b"IDAT", b"IEND"}
# EXIF IFD0 pointers to the Exif, GPS and Interoperability sub-IFDs (and their names for notes).
EXIF_SUB_IFDS = {0x8769: "Exif", 0x8825: "GPS", 0xA005: "Interoperability"}
# Tags tifffile writes itself (the resolution, from the dpi); an EXIF copy would be a duplicate.
TIFF_WRITER_TAGS = {282, 283, 296}
# TIFF tags holding IPTC-IIM (IPTC-NAA) and a Photoshop resource list (which may hold IPTC too).
TIFF_IPTC_TAG, TIFF_PHOTOSHOP_TAG = 33723, 34377
TIFF_IPTC_TAGS = (TIFF_IPTC_TAG, TIFF_PHOTOSHOP_TAG)
IPTC_TAG_WARNING = r"Metadata Warning, tag 33723 had too many entries"
PILLOW_TIFF_MODULE = r"PIL\.TiffImagePlugin$"  # the module that issues IPTC_TAG_WARNING
# TIFF field types tifffile can write as extratags (13, IFD, is a sub-IFD pointer: it cannot).
TIFF_VALUE_TYPES = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}


class ImageFileError(ValueError):
    """A file that cannot be protected; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, read without decoding the pixels (used to plan batches)."""

    path: Path
    width: int  # upright, after the EXIF orientation
    height: int
    mode: str
    bits: int  # 8 or 16 per channel, as the output will keep them
    has_alpha: bool
    deep_colour: bool  # 16-bit RGB(A): written as a 16-bit PNG or TIFF, as it came
    format: str | None = None  # Pillow's name of the file format: "PNG", "TIFF", "JPEG", ...


@dataclass
class LoadedImage:
    """An image as RGB in [0, 1] plus what is needed to save it back the way it came."""

    path: Path
    rgb: Tensor  # (3, H, W) float32 in [0, 1]; grey images are replicated
    alpha: np.ndarray | None  # (H, W) uint8 or uint16, written back unchanged
    grey: bool
    bits: int
    mode: str  # the mode of the file as opened
    icc_profile: bytes | None = None
    exif: bytes | None = None  # orientation and thumbnail removed
    xmp: bytes | str | None = None
    iptc: bytes | None = None  # IPTC-IIM datasets (By-line, CopyrightNotice, Keywords, ...)
    info: dict = field(default_factory=dict)  # dpi, PNG text chunks, gamma
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return (self.rgb.shape[2], self.rgb.shape[1])

    @property
    def levels(self) -> int:
        return 65535 if self.bits == 16 else 255


@dataclass(frozen=True)
class OutputPlan:
    """How one image is written: format, file suffix, levels per channel, and why if it differs."""

    format: str  # "PNG", "JPEG" or "TIFF"
    suffix: str
    levels: int
    note: str | None = None


# --- reading ---------------------------------------------------------------------------------


def ignore_false_iptc_warning() -> None:
    """Silence Pillow's IPTC_TAG_WARNING, process-wide, installed once when this module loads.

    Pillow drops a TIFF's IPTC tag stored as LONGs with this warning; the tag is read with
    tifffile instead (_tiff_iptc), so the warning says nothing true. A module-level filter, not
    ``warnings.catch_warnings()`` around each read: that swaps the global filter list and is not
    thread-safe (the web app reads images in job threads while models load). It is narrow: this
    message, UserWarning, issued by Pillow's TIFF plugin only.
    """
    warnings.filterwarnings(
        "ignore", message=IPTC_TAG_WARNING, category=UserWarning, module=PILLOW_TIFF_MODULE
    )


ignore_false_iptc_warning()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn every way a file can be unreadable into one :class:`ImageFileError` naming it."""
    try:
        if path.stat().st_size == 0:
            raise ImageFileError(f"{path}: empty file (0 bytes).")
        yield
    except ImageFileError:
        raise
    except FileNotFoundError as error:
        raise ImageFileError(f"{path}: no such file.") from error
    except IsADirectoryError as error:
        raise ImageFileError(f"{path}: is a folder, not an image.") from error
    except UnidentifiedImageError as error:
        raise ImageFileError(f"{path}: not an image Pillow can read.") from error
    except Image.DecompressionBombError as error:
        counts = [int(n) for n in re.findall(r"(\d+) pixels", str(error))]  # its size, the limit
        if len(counts) == 2:
            size, limit = math.ceil(counts[0] / 1e4) / 100, math.floor(counts[1] / 1e4) / 100
            detail = f"{size:g} megapixels, over the {limit:g} MP limit against decompression bombs"
            setting = f"MIMICSHIELD_MAX_MEGAPIXELS={size:g}"
        else:
            detail, setting = f"too many pixels ({error})", "MIMICSHIELD_MAX_MEGAPIXELS"
        raise ImageFileError(f"{path}: {detail}; if you trust the file, set {setting}.") from error
    except PermissionError as error:
        raise ImageFileError(f"{path}: permission denied.") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageFileError(f"{path}: corrupt or truncated image ({error}).") from error


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1


def _is_sixteen_bit_png(image: Image.Image) -> bool:
    """A PNG stored at 16 bits per channel (only visible in the tile, before ``load``)."""
    return image.format == "PNG" and any(";16" in str(tile[3]) for tile in image.tile)


def _is_deep_colour(image: Image.Image) -> bool:
    """16-bit RGB(A) that Pillow would reduce to 8 bits. For a PNG, call before ``load``."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "PNG":
        return _is_sixteen_bit_png(image)
    if image.format != "TIFF":
        return False
    bits = image.tag_v2.get(258)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return all(b == 16 for b in bits)


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """The size as stored, before any orientation (recent Pillow reports a TIFF's upright)."""
    if image.format == "TIFF":
        return int(image.tag_v2.get(256, image.width)), int(image.tag_v2.get(257, image.height))
    return image.size


def _check_mode(path: Path, mode: str) -> None:
    if mode not in GREY_MODES | SIXTEEN_BIT_GREY_MODES | COLOUR_MODES:
        raise ImageFileError(
            f"{path}: unsupported image mode {mode!r}; save it as 8- or 16-bit RGB or grey."
        )


def probe_image(path: str | Path) -> ImageHeader:
    """Read the header only: upright size, mode and bit depth, for planning batches cheaply."""
    path = Path(path)
    with _reading(path), Image.open(path) as opened:
        _check_mode(path, opened.mode)
        deep = _is_deep_colour(opened)  # first: getexif() may load() a PNG, losing its tile
        width, height = _stored_size(opened)
        if _orientation(opened) in (5, 6, 7, 8):
            width, height = height, width
        has_alpha = opened.mode in ALPHA_MODES or "transparency" in opened.info
        # 16-bit grey with a transparency key is read at 8 bits with an alpha (load_image)
        keyed = opened.mode in SIXTEEN_BIT_GREY_MODES and has_alpha
        bits = 16 if deep or (opened.mode in SIXTEEN_BIT_GREY_MODES and not keyed) else 8
        return ImageHeader(path, width, height, opened.mode, bits, has_alpha, deep, opened.format)


def load_image(path: str | Path) -> LoadedImage:
    """Decode ``path``, apply its EXIF orientation, and return it upright as RGB in [0, 1]."""
    path = Path(path)
    with _reading(path), Image.open(path) as opened:
        _check_mode(path, opened.mode)
        reduced = _is_sixteen_bit_png(opened)
        deep = _is_deep_colour(opened)  # before load(), which forgets how a PNG was stored
        stored_orientation = _orientation(opened)  # before load(), which may apply it (TIFF)
        upright_size = opened.size
        opened.load()  # also reads the metadata chunks after the pixels
        iptc, iptc_note = _iptc(path, opened)  # before a rotated TIFF is reread without its tags
        # Pillow's TIFF loader turns its pixels upright and drops the tag; pixels read with
        # tifffile or OpenCV are as stored and need the orientation read before load().
        orientation = stored_orientation if deep else _orientation(opened)
        if opened.format == "TIFF" and not deep and opened.size != upright_size:
            # Pillow 12 scrambles uncompressed L, I;16, RGBA, P and CMYK TIFFs stored rotated
            # (orientation 5-8) and leaves them at their stored size: read them as stored.
            opened, orientation = _tiff_as_stored(path, opened), stored_orientation
        loaded = _decode(path, opened, deep, orientation)
        loaded.iptc = iptc
        loaded.notes.extend([iptc_note] if iptc_note else [])
        if reduced and loaded.bits == 8:  # 16-bit grey with alpha
            loaded.notes.append("16-bit PNG read at 8 bits per channel (Pillow's limit)")
        return loaded


def _decode(path: Path, opened: Image.Image, deep: bool, orientation: int) -> LoadedImage:
    mode, info = opened.mode, opened.info
    notes: list[str] = []
    icc = info.get("icc_profile") or None
    has_transparency = "transparency" in info
    bits, grey = 8, False

    if deep:
        array = _read_png16(path) if opened.format == "PNG" else _read_tiff16(path)
        bits = 16
    elif mode in SIXTEEN_BIT_GREY_MODES and has_transparency:
        # A colour key: Pillow's conversions ignore it, so its alpha is made here; 16-bit grey
        # with alpha is read and saved at 8 bits, as a 16-bit LA file is (Pillow's limit).
        stored = np.asarray(opened).astype(np.uint16)
        opaque = stored != int(info["transparency"])
        grey8 = np.round(stored / 257).astype(np.uint8)
        array, grey = np.dstack([grey8, np.where(opaque, 255, 0).astype(np.uint8)]), True
        notes.append("its transparency key kept as an alpha channel")
    elif mode in SIXTEEN_BIT_GREY_MODES:
        array, bits, grey = np.asarray(opened).astype(np.uint16), 16, True
    elif mode in GREY_MODES:
        grey = True
        if mode == "1":
            notes.append("bilevel image saved as 8-bit grey")
        target = "LA" if mode in ALPHA_MODES or has_transparency else "L"
        array = np.asarray(opened.convert(target))
    elif mode == "CMYK":
        rgb, note = _cmyk_to_srgb(opened, icc)
        array, icc = np.asarray(rgb), _srgb_profile()
        notes.append(note)
    else:
        if mode in ("P", "PA"):
            notes.append("palette image saved as RGB(A): the perturbation needs more colours")
        target = "RGBA" if mode in ALPHA_MODES or has_transparency else "RGB"
        array = np.asarray(opened.convert(target))

    frames = getattr(opened, "n_frames", 1)
    if frames > 1:
        notes.append(f"only the first of {frames} frames is protected and saved")
    array = orient(array, orientation)
    alpha = None
    if grey:
        if array.ndim == 3:  # LA
            alpha, array = array[..., 1], array[..., 0]
        colour = np.repeat(array[..., None], 3, axis=2)
    else:
        if array.shape[2] == 4:
            alpha = array[..., 3]
        colour = array[..., :3]
    alpha = None if alpha is None else np.ascontiguousarray(alpha)
    levels = 65535 if bits == 16 else 255
    rgb = torch.from_numpy(colour.astype(np.float32) / levels).permute(2, 0, 1).contiguous()

    return LoadedImage(
        path=path,
        rgb=rgb,
        alpha=alpha,
        grey=grey,
        bits=bits,
        mode=mode,
        icc_profile=icc,
        exif=_exif_bytes(opened),
        xmp=info.get("xmp"),
        info=_kept_info(opened),
        notes=notes,
    )


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W[, C]) array, as ``ImageOps.exif_transpose``."""
    transforms: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    transform = transforms.get(orientation)
    return array if transform is None else np.ascontiguousarray(transform(array))


def _tiff_as_stored(path: Path, opened: Image.Image) -> Image.Image:
    """The TIFF's first page as stored, read with tifffile, in Pillow's mode, palette and info."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        array = tif.pages[0].asarray()
    if opened.mode == "I;16":
        array = array.astype("<u2")
    height, width = array.shape[:2]
    image = Image.frombytes(opened.mode, (width, height), np.ascontiguousarray(array).tobytes())
    if opened.mode == "P":
        image.putpalette(opened.getpalette())
    image.info = dict(opened.info)
    return image


def _read_tiff16(path: Path) -> np.ndarray:
    """A 16-bit colour TIFF's first page as (H, W, 3 or 4) uint16 (Pillow would reduce it)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        array = tif.pages[0].asarray()
    if array.ndim == 3 and array.shape[-1] not in (3, 4) and array.shape[0] in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar configuration: samples first
    if array.ndim != 3 or array.shape[-1] < 3:
        raise ImageFileError(f"{path}: unexpected 16-bit TIFF layout {array.shape}.")
    return array[..., :4].astype(np.uint16)


def _read_png16(path: Path) -> np.ndarray:
    """A 16-bit colour PNG as (H, W, 3 or 4) uint16 RGB(A), read with OpenCV (Pillow reduces it).

    Unlike Pillow, OpenCV turns a 16-bit ``tRNS`` colour key into a real alpha channel, which is
    what :func:`probe_image` promised (``has_alpha``). Pixels only: the metadata is Pillow's.
    """
    import cv2

    # imdecode on the bytes rather than imread on the path: imread cannot open non-ASCII paths
    # on Windows. IMREAD_UNCHANGED keeps 16 bits and alpha, and ignores the EXIF orientation.
    array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3 or array.shape[2] < 3:
        layout = "unreadable" if array is None else f"{array.dtype} {array.shape}"
        raise ImageFileError(f"{path}: unexpected 16-bit PNG layout ({layout}).")
    return np.ascontiguousarray(array[..., [2, 1, 0, 3][: array.shape[2]]])  # BGR(A) -> RGB(A)


# The creation date in an ICC profile's header: bytes 24-35 (six big-endian uint16).
ICC_DATE = slice(24, 36)
FIXED_ICC_DATE = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)


@lru_cache(maxsize=1)
def _srgb_profile() -> bytes:
    """littleCMS's sRGB profile with a fixed creation date: it stamps the current time, and the
    same input must give the same output bytes whenever it is protected. (The profile ID,
    bytes 84-99, is left zero, "not computed", so the date is free to change.)"""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[ICC_DATE] = FIXED_ICC_DATE
    return bytes(profile)


def _cmyk_to_srgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, str]:
    """CMYK -> sRGB through the file's own profile; Pillow's naive formula only if it has none."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.ImageCmsProfile(io.BytesIO(_srgb_profile()))
            converted = ImageCms.profileToProfile(
                image,
                source,
                srgb,
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode="RGB",
                flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
            )
            return converted, "CMYK converted to sRGB with its ICC profile; saved as RGB"
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB"), "CMYK without a usable ICC profile converted naively to RGB"


def _exif_bytes(image: Image.Image) -> bytes | None:
    try:
        return clean_exif(image.getexif())
    except Exception:  # unreadable EXIF: keep the pixels, drop the block
        return None


def _iptc(path: Path, image: Image.Image) -> tuple[bytes | None, str | None]:
    """The IPTC-IIM of a JPEG, PNG or TIFF, and a note when it was dropped (damaged, or a TIFF
    whose tags tifffile cannot read).

    A damaged block costs only itself: the pixels and the other metadata are still protected.
    WebP and BMP have no place for IIM (a WebP's IPTC fields live in its XMP, which is kept).
    """
    try:
        if image.format in ("JPEG", "MPO"):
            applist = getattr(image, "applist", [])
            return iptc_from_app13([data for marker, data in applist if marker == "APP13"]), None
        if image.format == "PNG":
            text = getattr(image, "text", {})
            for key in (IPTC_RAW_PROFILE, IRB_RAW_PROFILE):
                if isinstance(text.get(key), str):
                    return iptc_from_raw_profile(text[key]), None
        if image.format == "TIFF":
            return _tiff_iptc(path)
    except (ValueError, struct.error) as error:
        return None, f"damaged IPTC metadata not copied ({error})"
    return None, None


def _tiff_iptc(path: Path) -> tuple[bytes | None, str | None]:
    """Tag 33723, else the IPTC resource of tag 34377, read with tifffile: writers store 33723
    as UNDEFINED or as LONG, and Pillow drops a LONG one ("too many entries"); tifffile gives
    the bytes as stored either way. A file whose tags tifffile cannot read gets a note saying
    so (its IPTC may be fine); damaged IPTC raises ValueError, as elsewhere."""
    import tifffile

    try:  # tifffile.TiffFileError is a ValueError
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            iptc, photoshop = (getattr(tags.get(t), "value", None) for t in TIFF_IPTC_TAGS)
    except (ValueError, struct.error) as error:
        return None, f"IPTC metadata not copied: tifffile could not read the file's tags ({error})"
    if isinstance(iptc, bytes):
        return checked_iptc(iptc), None
    if isinstance(photoshop, bytes):
        return iptc_from_irb(photoshop), None
    return None, None


def _kept_info(image: Image.Image) -> dict:
    kept: dict = {}
    if "dpi" in image.info:
        kept["dpi"] = image.info["dpi"]
    text = getattr(image, "text", None) if image.format == "PNG" else None
    if text:
        kept["text"] = {k: v for k, v in text.items() if k not in SKIPPED_PNG_TEXT}
    return kept


# --- writing ---------------------------------------------------------------------------------


def plan_output(header: ImageHeader, file_format: str = "png") -> OutputPlan:
    """Where the pixels go: lossless PNG by default, 16-bit TIFF for 16-bit colour, or JPEG."""
    if file_format not in OUTPUT_FORMATS:
        raise ValueError(f"file_format must be one of {OUTPUT_FORMATS}; got {file_format!r}.")
    if file_format == "jpeg":
        if header.has_alpha:
            raise ImageFileError(
                f"{header.path}: has transparency, which JPEG cannot store; use --format png."
            )
        note = "16-bit image saved as 8-bit JPEG" if header.bits == 16 else None
        return OutputPlan("JPEG", ".jpg", 255, note)
    if header.deep_colour and header.format == "TIFF":
        return OutputPlan("TIFF", ".tif", 65535, "16-bit colour TIFF saved as a 16-bit TIFF")
    return OutputPlan("PNG", ".png", 65535 if header.bits == 16 else 255)


def to_array(pixels: Tensor, loaded: LoadedImage, levels: int) -> np.ndarray:
    """(3, H, W) in [0, 1] on the ``levels`` grid -> the file's (H, W[, C]) integer array."""
    dtype = np.uint16 if levels > 255 else np.uint8
    values = (pixels.clamp(0, 1) * levels).round().to(torch.int32).numpy()
    array = values[0] if loaded.grey else values.transpose(1, 2, 0)
    array = array.astype(dtype)
    if loaded.alpha is None:
        return np.ascontiguousarray(array)
    alpha = loaded.alpha
    if alpha.dtype != dtype:  # only for 16-bit inputs saved at 8 bits
        alpha = (alpha.astype(np.float64) * levels / np.iinfo(alpha.dtype).max).round()
    planes = [array] if array.ndim == 2 else [array[..., c] for c in range(3)]
    return np.stack([*planes, alpha.astype(dtype)], axis=-1)


def save_image(
    array: np.ndarray,
    loaded: LoadedImage,
    destination: Path,
    plan: OutputPlan,
    *,
    quality: int = 95,
    provenance: bool = True,
    strip_metadata: bool = False,
) -> list[str]:
    """Write ``array`` atomically with the input's metadata; return notes on what was left out.

    Always kept: the ICC profile (the colours depend on it) and the dpi. Kept unless
    ``strip_metadata``: EXIF (orientation and thumbnail removed), XMP, IPTC-IIM and PNG text
    chunks. ``strip_metadata`` is the privacy option: EXIF with its GPS, XMP, IPTC (names and
    places) and text comments all go.
    ``provenance`` merges the "no AI/ML training" properties into the XMP (with
    ``strip_metadata``, that notice is the only XMP written).

    Per output: 8-bit PNG, 16-bit grey PNG and JPEG through Pillow. 16-bit colour PNG: OpenCV
    encodes the pixels and Pillow the metadata, so it carries what an 8-bit PNG would (see
    :func:`_encode_png16`). 16-bit TIFF through ``tifffile``: ICC, XMP, dpi and the tags of
    EXIF's main IFD, but not its Exif and GPS sub-IFDs (see :func:`_tiff_exif_tags`).

    IPTC-IIM goes where each format keeps it: a JPEG's APP13 "Photoshop 3.0" segment (Pillow has
    no option for it, so it is spliced into the encoded bytes; a block over one segment's 64 KB is
    left out with a note), a PNG's "Raw profile type iptc" zTXt chunk (none when the copied
    "Raw profile type 8bim" chunk already carries the same IPTC), a TIFF's tag 33723.
    """
    exif = None if strip_metadata else loaded.exif
    xmp = merge_xmp(None if strip_metadata else loaded.xmp, provenance=provenance)
    text = {} if strip_metadata else loaded.info.get("text", {})
    iptc = None if strip_metadata else loaded.iptc
    icc, dpi = loaded.icc_profile, loaded.info.get("dpi")
    notes: list[str] = []
    app13 = iptc_app13(iptc) if iptc and plan.format == "JPEG" else None
    if iptc and plan.format == "JPEG" and app13 is None:
        notes.append(
            f"IPTC metadata ({len(iptc)} bytes) not copied: over the 64 KB of one JPEG segment"
        )

    def pillow_options() -> dict:
        options: dict = {"icc_profile": icc, "exif": exif, "dpi": dpi}
        if plan.format == "JPEG":
            options.update(quality=quality, subsampling=0, xmp=xmp)
        else:
            options["pnginfo"] = _png_info(text, xmp, iptc)
        return {k: v for k, v in options.items() if v is not None}

    def write_pillow(temporary: Path) -> None:
        picture = Image.fromarray(array)
        if app13 is None:
            picture.save(temporary, format=plan.format, **pillow_options())
            return
        encoded = io.BytesIO()
        picture.save(encoded, format=plan.format, **pillow_options())
        temporary.write_bytes(insert_jpeg_segment(encoded.getvalue(), app13))

    def write_png16(temporary: Path) -> None:
        # Pillow cannot hold 16-bit colour, but it writes the metadata chunks: save them with a
        # 1x1 image and move them into OpenCV's file, so both PNG paths share one metadata writer.
        template = io.BytesIO()
        Image.new("RGB", (1, 1)).save(template, format="PNG", **pillow_options())
        temporary.write_bytes(_encode_png16(array, template.getvalue()))

    exif_tags: list[tuple] = []
    if plan.format == "TIFF" and exif:
        try:
            exif_tags, dropped = _tiff_exif_tags(exif)
        except Exception:  # a block Pillow wrote but cannot read back: keep the pixels
            dropped = ["all"]
        if dropped:
            notes.append(
                f"EXIF {' and '.join(dropped)} tags not copied into the 16-bit TIFF "
                "(tifffile cannot write them)"
            )

    def write_tiff(temporary: Path) -> None:
        import tifffile

        def imwrite(tags: list[tuple]) -> None:
            xmp_tags = [(700, "B", len(xmp), xmp, True)] if xmp else []
            if iptc:  # UNDEFINED (7): IIM is bytes; LONG, which some writers use, needs padding
                xmp_tags.append((TIFF_IPTC_TAG, 7, len(iptc), iptc, True))
            options: dict = {}
            if dpi:
                options.update(resolution=(float(dpi[0]), float(dpi[1])), resolutionunit="INCH")
            tifffile.imwrite(
                temporary,
                array,
                photometric="rgb",
                extrasamples=["unassalpha"] if array.shape[-1] == 4 else None,
                compression="zlib",
                iccprofile=icc,
                extratags=xmp_tags + tags,
                metadata=None,
                software=False,  # the input's Software tag, if any, comes with the EXIF
                **options,
            )

        try:
            imwrite(exif_tags)
        except (ValueError, struct.error) as error:  # an EXIF value tifffile cannot pack
            imwrite([])
            notes.append(f"EXIF not copied into the 16-bit TIFF ({error})")

    if plan.format == "TIFF":
        writer = write_tiff
    elif plan.format == "PNG" and array.dtype == np.uint16 and array.ndim == 3:
        writer = write_png16
    else:
        writer = write_pillow
    write_atomically(destination, writer)
    return notes


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, the whole chunk: length, type, data and CRC) for each chunk of a PNG file."""
    if not data.startswith(PNG_SIGNATURE):
        raise OSError("not a PNG stream")
    chunks, position = [], len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        end = position + 12 + length
        chunks.append((data[position + 4 : position + 8], data[position:end]))
        position = end
    return chunks


def _encode_png16(array: np.ndarray, metadata_png: bytes) -> bytes:
    """A 16-bit RGB(A) PNG: OpenCV's pixel chunks with the metadata chunks of ``metadata_png``.

    Kept from ``metadata_png`` (written by Pillow with the same options as an 8-bit output):
    iCCP (ICC profile), pHYs (dpi), eXIf (EXIF), and the tEXt / zTXt / iTXt text chunks, which
    hold the PNG text and the XMP. They go right after IHDR, where every one of them may stand
    (iCCP and pHYs must precede IDAT). Copied whole, so their CRCs stay valid. Not kept, as for
    8-bit PNG outputs: gAMA / cHRM / sRGB / sBIT chunks of the input.
    """
    import cv2

    order = [2, 1, 0, 3][: array.shape[2]]  # RGB(A) -> OpenCV's BGR(A)
    pixels = np.ascontiguousarray(array[..., order])
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise OSError("OpenCV could not encode the 16-bit PNG")
    image = [chunk for kind, chunk in _png_chunks(encoded.tobytes()) if kind in PNG_IMAGE_CHUNKS]
    metadata = [chunk for kind, chunk in _png_chunks(metadata_png) if kind in PNG_METADATA_CHUNKS]
    header, rest = image[0], image[1:]  # IHDR is always first
    return PNG_SIGNATURE + header + b"".join(metadata) + b"".join(rest)


def _tiff_exif_tags(exif: bytes) -> tuple[list[tuple], list[str]]:
    """EXIF's main IFD as tifffile ``extratags``, and the names of the sub-IFDs left out.

    The main IFD's tags (Artist, Copyright, Make, Model, DateTime, ImageDescription, Software,
    ...) are ordinary TIFF tags: they are written as they are, with Pillow's types. The Exif
    sub-IFD (exposure, DateTimeOriginal, lens, ...), GPS and Interoperability are not: tifffile
    writes no IFD-pointer tags (``TIFF.TAG_FILTERED`` drops ExifTag, GPSTag and
    InteroperabilityTag from extratags; its docs: "ExifIFD and GPSIFD tags are not supported").
    Adding them would mean patching offsets into the file after tifffile closed it, a hand-made
    TIFF writer, so they are left out and the caller notes it.
    """
    data = exif.removeprefix(b"Exif\x00\x00")
    ifd = ImageFileDirectory_v2(data[:8])
    stream = io.BytesIO(data)
    stream.seek(ifd.next)
    ifd.load(stream)
    tags, dropped = [], []
    for tag in sorted(ifd.keys()):
        kind, value = ifd.tagtype.get(tag), ifd[tag]
        if tag in EXIF_SUB_IFDS:
            dropped.append(EXIF_SUB_IFDS[tag])
        elif tag in TIFF_WRITER_TAGS or kind not in TIFF_VALUE_TYPES:
            continue
        elif tag == 270 and _is_tifffile_shape(value):
            continue  # the JSON tifffile writes to describe an input's array, not the picture
        else:
            tags.append(_tiff_tag(tag, kind, value))
    return tags, dropped


def _is_tifffile_shape(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith('{"shape":'):
        return False
    try:
        return isinstance(json.loads(value), dict)
    except ValueError:
        return False


def _tiff_tag(tag: int, kind: int, value: object) -> tuple:
    """One EXIF value as a tifffile extratag (code, type, count, value, writeonce)."""
    if kind == 2:  # Pillow decodes ASCII as Latin-1: encoding back gives the same bytes
        text = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        return (tag, 2, 0, text, True)
    if isinstance(value, bytes):  # BYTE and UNDEFINED: already packed
        return (tag, kind, 0, value, True)
    values = value if isinstance(value, tuple) else (value,)
    if kind in (5, 10):  # (S)RATIONAL: numerator, denominator pairs
        pairs = tuple(int(n) for ratio in values for n in (ratio.numerator, ratio.denominator))
        return (tag, kind, len(values), pairs, True)
    return (tag, kind, len(values), values, True)


def _png_info(text: dict[str, str], xmp: bytes | None, iptc: bytes | None = None) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        if key == IRB_RAW_PROFILE and isinstance(value, str):  # hex: zTXt, as ImageMagick writes
            info.add_text(key, value, zip=True)
        elif isinstance(value, str):
            info.add_itxt(key, value)
    if xmp:
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=False)
    if iptc and not _irb_profile_holds(text, iptc):
        # zTXt, Latin-1 text: the profile is hex digits, as ImageMagick and exiftool write it
        info.add_text(IPTC_RAW_PROFILE, iptc_raw_profile(iptc), zip=True)
    return info


def _irb_profile_holds(text: dict[str, str], iptc: bytes) -> bool:
    """Whether the copied "Raw profile type 8bim" chunk already carries ``iptc`` (a second
    IPTC chunk would make readers see every dataset twice)."""
    profile = text.get(IRB_RAW_PROFILE)
    try:
        return isinstance(profile, str) and iptc_from_raw_profile(profile) == iptc
    except (ValueError, struct.error):
        return False


class ReadOnlyFileError(PermissionError):
    """An output the user made read-only: they meant to keep it, so it is never replaced."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is read-only; not replaced.")
        self.path = path


def is_read_only(path: Path) -> bool:
    """Whether ``path`` is a file without write permission for its owner, or for us.

    The owner's write bit is what ``chmod -w`` and "read-only" in a file manager clear; it is
    read from the mode rather than asked of ``os.access``, which says yes to root.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not stat.S_ISREG(mode):
        return False
    return not mode & stat.S_IWUSR or not os.access(path, os.W_OK)


def write_atomically(destination: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` beside ``destination``, flush it to disk, then rename.

    Why: an interrupted run (Ctrl-C, crash, full disk) must never leave a half-written file
    under the final name, where a resumed run would take it for a finished one.

    The file gets the mode ``open()`` would give it: the user's umask for a new file, the
    mode of the file it replaces otherwise (writers such as safetensors' make 0600 files). A
    read-only ``destination`` is refused with :class:`ReadOnlyFileError`.
    """
    if is_read_only(destination):
        raise ReadOnlyFileError(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        mode = _mode_for(destination, temporary)
        write(temporary)
        with contextlib.suppress(OSError):  # best effort: some network shares refuse chmod
            os.chmod(temporary, mode)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(destination: Path, text: str) -> None:
    """:func:`write_atomically` for a text file (UTF-8, line endings as given)."""
    write_atomically(
        destination, lambda temporary: temporary.write_text(text, encoding="utf-8", newline="")
    )


def _mode_for(destination: Path, temporary: Path) -> int:
    """The permission bits ``open(destination, "w")`` would leave: those of the file it
    replaces, else 0666 less the umask. Read by creating ``temporary`` empty with 0666:
    ``os.umask`` can only be read by changing it, which races with other threads."""
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(descriptor).st_mode
    finally:
        os.close(descriptor)
    with contextlib.suppress(OSError):
        if stat.S_ISREG(existing := os.stat(destination).st_mode):
            mode = existing
    return stat.S_IMODE(mode) & 0o777


def remove_partial_files(destinations: Iterable[Path]) -> list[Path]:
    """Delete the temporary files a killed run left beside these outputs.

    Only the names :func:`write_atomically` makes for these very outputs
    (``.NAME.XXXXXXXX.part``): another ``.part`` file in the output folder, a download of the
    user's say, is not ours to delete.
    """
    removed = []
    for destination in destinations:
        if not destination.parent.is_dir():
            continue
        prefix = f".{destination.name}."
        for path in destination.parent.glob(f"{glob.escape(prefix)}*{PARTIAL_SUFFIX}"):
            ours = PARTIAL_NAME.fullmatch(path.name) and len(path.name) == len(prefix) + 13
            if ours and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# --- plain 8-bit pictures (mimicry samples, previews, the PIL side of the Python API) -----------
# Protected outputs go through :func:`save_image`, which keeps the input's depth and metadata.


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an 8-bit RGB PIL image."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> Tensor:
    """A PIL image -> (3, H, W) RGB in [0, 1].

    High-depth grey is scaled here, as :func:`load_image` scales 16-bit files: Pillow's
    ``convert("RGB")`` would clip it to 8 bits instead.
    """
    if image.mode in SIXTEEN_BIT_GREY_MODES or image.mode in ("I", "F"):
        grey = _high_depth_grey(image)
        return torch.from_numpy(grey)[None].expand(3, -1, -1).contiguous()
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _high_depth_grey(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a 16-bit (``I;16*``), 32-bit integer or float grey image.

    16-bit and ``I`` are on the 65535-level scale (Pillow opens 16-bit PNGs as either); ``F``
    must already be in [0, 1]. Other ranges are ambiguous, so they are refused.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError("A PIL image of mode 'F' must hold finite values in [0, 1].")
        return values.astype(np.float32)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(
            f"A PIL image of mode {image.mode!r} must hold 16-bit values (0 to 65535); "
            "scale it to [0, 1] and pass a tensor."
        )
    return (values / 65535).astype(np.float32)


def save_png(image: Tensor, path: Path, alpha: np.ndarray | None = None) -> Path:
    """Save a (3, H, W) image in [0, 1] as an 8-bit PNG, creating folders as needed.

    ``alpha`` (H, W), uint8 or uint16 as :func:`load_image` returns it, is attached unchanged
    (16-bit alpha is reduced to 8 bits), so a transparent image stays so.

    Written through :func:`write_atomically`: ``purify`` and ``mimic`` stopped by Ctrl-C
    must not leave a truncated PNG under the final name.
    """
    path = Path(path)
    picture = to_pil(image)
    if alpha is not None:
        alpha8 = (alpha >> 8).astype(np.uint8) if alpha.dtype == np.uint16 else alpha
        picture.putalpha(Image.fromarray(alpha8.astype(np.uint8), mode="L"))
    write_atomically(path, lambda temporary: picture.save(temporary, format="PNG"))
    return path
