"""Image files in and out: decoding, orientation, and lossless saving. I/O lives only here."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}


class ImageFileError(ValueError):
    """A file that cannot be protected; the message names the file and the problem."""


@dataclass
class LoadedImage:
    """An image as RGB in [0, 1] plus what is needed to save it back the way it came."""

    path: Path
    rgb: Tensor  # (3, H, W) float32 in [0, 1]
    alpha: Image.Image | None
    mode: str
    info: dict

    @property
    def size(self) -> tuple[int, int]:
        return (self.rgb.shape[2], self.rgb.shape[1])


def load_image(path: str | Path) -> LoadedImage:
    """Decode ``path``, apply its EXIF orientation, and return it upright as RGB in [0, 1]."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageFileError(f"{path}: empty file (0 bytes).")
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            mode = opened.mode
            info = dict(opened.info)
    except ImageFileError:
        raise
    except FileNotFoundError as error:
        raise ImageFileError(f"{path}: no such file.") from error
    except UnidentifiedImageError as error:
        raise ImageFileError(f"{path}: not an image Pillow can read.") from error
    except Image.DecompressionBombError as error:
        raise ImageFileError(f"{path}: too many pixels (decompression-bomb limit).") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageFileError(f"{path}: corrupt or truncated image ({error}).") from error

    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return LoadedImage(path=path, rgb=tensor, alpha=alpha, mode=mode, info=info)


def to_pil(rgb: Tensor, alpha: Image.Image | None = None) -> Image.Image:
    """(3, H, W) in [0, 1] -> an 8-bit PIL image, with the original alpha channel re-attached."""
    array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array, mode="RGB")
    if alpha is not None:
        image.putalpha(alpha)
    return image


def save_atomically(image: Image.Image, destination: Path, **save_kwargs) -> None:
    """Write to a temporary file beside ``destination``, then rename: never a half-written file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".part", dir=destination.parent
    )
    os.close(handle)
    try:
        image.save(temporary, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
