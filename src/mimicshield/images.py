"""Image files in and out: decoding every common mode, orientation, metadata and atomic saving.

I/O lives only here (and in :mod:`mimicshield.runner`, which calls it). An image is decoded to RGB
in [0, 1] for the engine plus everything needed to write it back the way the user made it: the
alpha channel untouched, the bit depth, whether it was grey, the ICC profile, EXIF and XMP.

Choices, per input mode:

- ``RGB`` / ``RGBA``: protected as they are; the alpha channel is copied bit for bit.
- ``L`` / ``LA`` / ``1``: protected as grey replicated to RGB; one perturbation for all three
  channels, so the output stays grey (``1`` is saved as ``L``: a bilevel image cannot hold it).
- ``P`` / ``PA``: a perturbation does not fit a 256-colour palette, so these are protected and
  saved as RGB(A).
- ``CMYK``: converted to sRGB through its embedded ICC profile (relative colorimetric with
  black-point compensation, the usual choice for CMYK -> RGB), saved as RGB with an sRGB profile.
- ``I;16`` and 16-bit RGB(A) TIFF: kept at 16 bits; the budget is enforced on the 65535-level grid.
  Pillow reads 16-bit colour TIFFs at 8 bits and cannot write 16-bit colour PNG, so those are read
  and written with ``tifffile`` (the output is a lossless 16-bit TIFF).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from .metadata import ORIENTATION, clean_exif, merge_xmp

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
OUTPUT_FORMATS = ("png", "jpeg")
PARTIAL_SUFFIX = ".part"
PARTIAL_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.part")

GREY_MODES = {"1", "L", "LA", "La"}
SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "YCbCr", "P", "PA", "CMYK"}
ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
# PNG text chunks that are stale copies of metadata handled elsewhere (ImageMagick writes these).
SKIPPED_PNG_TEXT = {"XML:com.adobe.xmp", "Raw profile type exif", "Raw profile type APP1"}


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
    deep_colour: bool  # 16-bit RGB(A): written as TIFF


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
        raise ImageFileError(
            f"{path}: too many pixels ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from error
    except PermissionError as error:
        raise ImageFileError(f"{path}: permission denied.") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageFileError(f"{path}: corrupt or truncated image ({error}).") from error


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1


def _is_deep_colour(image: Image.Image) -> bool:
    if image.format != "TIFF" or image.mode not in ("RGB", "RGBA"):
        return False
    bits = image.tag_v2.get(258)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return all(b == 16 for b in bits)


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
        width, height = opened.size
        if _orientation(opened) in (5, 6, 7, 8):
            width, height = height, width
        deep = _is_deep_colour(opened)
        bits = 16 if deep or opened.mode in SIXTEEN_BIT_GREY_MODES else 8
        has_alpha = opened.mode in ALPHA_MODES or "transparency" in opened.info
        return ImageHeader(path, width, height, opened.mode, bits, has_alpha, deep)


def load_image(path: str | Path) -> LoadedImage:
    """Decode ``path``, apply its EXIF orientation, and return it upright as RGB in [0, 1]."""
    path = Path(path)
    with _reading(path), Image.open(path) as opened:
        _check_mode(path, opened.mode)
        reduced = opened.format == "PNG" and any(";16" in str(t.args) for t in opened.tile)
        opened.load()
        loaded = _decode(path, opened)
        if reduced and loaded.bits == 8:
            loaded.notes.append("16-bit colour PNG read at 8 bits per channel (Pillow's limit)")
        return loaded


def _decode(path: Path, opened: Image.Image) -> LoadedImage:
    mode, info = opened.mode, opened.info
    notes: list[str] = []
    icc = info.get("icc_profile") or None
    has_transparency = "transparency" in info
    bits, grey = 8, False

    if _is_deep_colour(opened):
        array, bits = _read_tiff16(path), 16
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
    array = orient(array, _orientation(opened))
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


@lru_cache(maxsize=1)
def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


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
    if header.deep_colour:
        note = "16-bit colour saved as a 16-bit TIFF (lossless; Pillow cannot write 16-bit PNG)"
        return OutputPlan("TIFF", ".tif", 65535, note)
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
) -> None:
    """Write ``array`` atomically with the input's ICC profile, EXIF, XMP (+ provenance), dpi."""
    xmp = merge_xmp(loaded.xmp, provenance=provenance)
    icc, exif, dpi = loaded.icc_profile, loaded.exif, loaded.info.get("dpi")

    def write_pillow(temporary: Path) -> None:
        image = Image.fromarray(array)
        options: dict = {"icc_profile": icc, "exif": exif, "dpi": dpi}
        if plan.format == "JPEG":
            options.update(quality=quality, subsampling=0, xmp=xmp)
        else:
            options["pnginfo"] = _png_info(loaded.info.get("text", {}), xmp)
        options = {k: v for k, v in options.items() if v is not None}
        image.save(temporary, format=plan.format, **options)

    def write_tiff(temporary: Path) -> None:
        import tifffile

        extratags = [(700, "B", len(xmp), xmp, True)] if xmp else []
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
            extratags=extratags,
            metadata=None,
            **options,
        )

    write_atomically(destination, write_tiff if plan.format == "TIFF" else write_pillow)


def _png_info(text: dict[str, str], xmp: bytes | None) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        if isinstance(value, str):
            info.add_itxt(key, value)
    if xmp:
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=False)
    return info


def write_atomically(destination: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` beside ``destination``, flush it to disk, then rename.

    Why: an interrupted run (Ctrl-C, crash, full disk) must never leave a half-written file
    under the final name, where a resumed run would take it for a finished one.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (``.NAME.XXXXXXXX.part``, our pattern
    only: a user's own ``.part`` files are not ours to delete)."""
    removed = []
    if folder.is_dir():
        for path in folder.rglob(f".*{PARTIAL_SUFFIX}"):
            if PARTIAL_NAME.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
