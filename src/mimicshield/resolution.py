"""Protecting images at the size the user has them: work size, padding and overlapping tiles.

The engine (:class:`~mimicshield.protector.Protector`) protects batches of equal-size tensors whose
sides are multiples of 8 (the VAE's downsampling). This module gets any image there and back
without ever stretching or cropping the user's picture:

- ``work_size=None`` ("native"): protect at full resolution; pad by reflection to a multiple of 8
  and crop the padding off again.
- ``work_size=N``: compute the perturbation with the shorter side at N (the aspect ratio kept),
  then resize the *perturbation*, not the image, back onto the original. Smaller images are
  protected at their own size (never upscaled). Bilinear resizing is a
  convex combination, so the resized perturbation stays within the budget.
- Work images larger than ``tile_size`` on a side are protected in overlapping tiles whose
  perturbations are cross-faded with linear ramps: a convex blend again (every pixel within eps)
  and no hard edge where two tiles meet.

The caller quantises the result to the file's bit depth (see ``quantize_within_budget``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .defaults import DEFAULT_TILE_SIZE

MULTIPLE = 8  # the VAE's downsampling
TILE_OVERLAP = 64  # pixels two neighbouring tiles share, cross-faded


def parse_work_size(text: str | int | None) -> int | None:
    """``"native"`` -> None, ``"512"`` -> 512: the ``--work-size`` option."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "native"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"work size must be 'native' or a number of pixels; got {text!r}."
        ) from None
    if value < MULTIPLE:
        raise ValueError(f"work size must be at least {MULTIPLE} pixels; got {value}.")
    return value


def work_shape(height: int, width: int, work_size: int | None) -> tuple[int, int]:
    """(height, width) the perturbation is computed at: the shorter side down to ``work_size``.

    Images already at or below ``work_size`` keep their own size. Upscaling them would put the
    perturbation on a finer grid than the file has, and resizing it back averages neighbouring
    signs away: a 40x48 image protected at 512 for 3 steps changed by 0.0002 grey levels on
    average, against more than 0.5 at its own size.
    """
    if work_size is None or min(height, width) <= work_size:
        return height, width
    scale = work_size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def padded_shape(height: int, width: int) -> tuple[int, int]:
    return _round_up(height), _round_up(width)


def _round_up(n: int) -> int:
    return -(-n // MULTIPLE) * MULTIPLE


def pad_to_multiple(x: Tensor) -> Tensor:
    """Pad (N, C, H, W) at the bottom and right to multiples of 8, by reflection where possible.

    Reflection continues edges and texture, so the padding looks like more of the image and the
    perturbation near the border is computed in a realistic context. Images with a side shorter
    than the padding cannot be reflected and are padded by replication instead.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = _round_up(height) - height, _round_up(width) - width
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts covering ``length``, neighbours overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [i * (length - tile) // (count - 1) for i in range(count)]


def _ramp(start: int, tile: int, length: int, overlap: int) -> Tensor:
    """1-D blending weight of one tile: 1 inside, rising linearly over overlaps with neighbours."""
    weight = torch.ones(tile)
    rise = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if start > 0:
        weight[:overlap] = torch.minimum(weight[:overlap], rise)
    if start + tile < length:
        weight[-overlap:] = torch.minimum(weight[-overlap:], rise.flip(0))
    return weight


def balanced_tile(length: int, tile: int, overlap: int) -> int:
    """The smallest tile (a multiple of 8, at most ``tile``) that covers ``length`` in as few
    tiles as ``tile`` itself needs: 1032 px at 1024 takes two 552 px tiles, not two of 1024."""
    if length <= tile:
        return length
    count = math.ceil((length - overlap) / (tile - overlap))
    return min(tile, _round_up(math.ceil((length + (count - 1) * overlap) / count)))


def tile_shape(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """The (height, width) of the tiles an image of that work size is protected in."""
    tile_h, tile_w, _ = _tile_layout(height, width, tile_size)
    return tile_h, tile_w


def _tile_layout(height: int, width: int, tile_size: int) -> tuple[int, int, int]:
    tile_h = min(height, tile_size // MULTIPLE * MULTIPLE)
    tile_w = min(width, tile_size // MULTIPLE * MULTIPLE)
    overlap = min(TILE_OVERLAP, min(tile_h, tile_w) // 4 // MULTIPLE * MULTIPLE or MULTIPLE)
    return balanced_tile(height, tile_h, overlap), balanced_tile(width, tile_w, overlap), overlap


def protect_tiled(
    protector,
    x: Tensor,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 1,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The perturbation of padded images ``x`` (N, 3, H, W), protected in tiles of at most
    ``tile_size``, as few as it allows (:func:`balanced_tile`).

    Tiles of all images go through the engine ``batch_size`` at a time; tile k uses seed
    ``seed + k`` so neighbouring tiles do not repeat one noise pattern.
    """
    count, _, height, width = x.shape
    tile_h, tile_w, overlap = _tile_layout(height, width, tile_size)
    ys, xs = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    corners = [(y, x0) for y in ys for x0 in xs]
    single = len(corners) == 1
    seed = protector.config.seed

    crops = [(i, k, y, x0) for i in range(count) for k, (y, x0) in enumerate(corners)]
    chunks = [crops[s : s + batch_size] for s in range(0, len(crops), batch_size)]
    steps = max(protector.config.steps, 1)
    total = steps * len(chunks)
    delta = torch.zeros_like(x)
    weight_sum = torch.zeros(1, 1, height, width)

    for index, chunk in enumerate(chunks):
        tiles = torch.stack([x[i, :, y : y + tile_h, x0 : x0 + tile_w] for i, _, y, x0 in chunk])
        seeds = None if single else [seed + k for _, k, _, _ in chunk]

        def on_step(step: int, _total: int, done: int = index * steps) -> None:
            if callback is not None:
                callback(done + step, total)

        protected = protector.protect(tiles, seeds=seeds, callback=on_step).images
        for (i, _, y, x0), adv, clean in zip(chunk, protected, tiles, strict=True):
            w = _ramp(y, tile_h, height, overlap)[:, None] * _ramp(x0, tile_w, width, overlap)
            delta[i, :, y : y + tile_h, x0 : x0 + tile_w] += w * (adv - clean)
            if i == 0:
                weight_sum[0, 0, y : y + tile_h, x0 : x0 + tile_w] += w
    return delta / weight_sum


def protect_at_work_size(
    protector,
    images: Sequence[Tensor],
    *,
    work_size: int | None,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 1,
    callback: Callable[[int, int], None] | None = None,
) -> list[Tensor]:
    """Protect (3, H, W) images in [0, 1] whose padded work shapes are equal; unquantised.

    The images may differ in size (1000x750 and 1001x751 share a work shape at 512; 16x20 and
    16x21 share the padded shape 16x24): each is resized to its own work shape and padded, and
    gets the perturbation cropped and resized back to its own size. The engine's own 8-bit
    quantisation is switched off here: the caller quantises once, at full resolution and the
    file's bit depth.
    """
    shapes = [work_shape(*image.shape[-2:], work_size) for image in images]
    padded = {padded_shape(*shape) for shape in shapes}
    if len(padded) != 1:
        raise ValueError(f"images in one batch need one padded work shape; got {sorted(padded)}.")
    work = torch.cat(
        [
            pad_to_multiple(_resize(image[None], shape, "bicubic").clamp(0, 1))
            for image, shape in zip(images, shapes, strict=True)
        ]
    )
    engine = _unquantised(protector)
    delta = protect_tiled(
        engine, work, tile_size=tile_size, batch_size=batch_size, callback=callback
    )
    results = []
    for image, shape, image_delta in zip(images, shapes, delta, strict=True):
        image_delta = image_delta[:, : shape[0], : shape[1]]
        image_delta = _resize(image_delta[None], tuple(image.shape[-2:]), "bilinear")[0]
        results.append((image + image_delta).clamp(0, 1))
    return results


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def _unquantised(protector):
    """The same protector with its 8-bit rounding off (the caller rounds at full resolution)."""
    if getattr(protector.config, "quantize_levels", None) is None:
        return protector
    engine = copy.copy(protector)
    engine.config = replace(protector.config, quantize_levels=None)
    return engine
