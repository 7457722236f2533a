"""Work size, padding and tiles: the output never changes size and every pixel stays within eps."""

from __future__ import annotations

import itertools

import pytest
import torch
from fake_engines import NoiseEngine, TilePainter

from mimicshield.attack import quantize_within_budget
from mimicshield.protector import Protector
from mimicshield.resolution import (
    balanced_tile,
    pad_to_multiple,
    parse_work_size,
    protect_at_work_size,
    protect_tiled,
    tile_starts,
    work_shape,
)

EPS = 8 / 255


def test_parse_work_size():
    assert parse_work_size("native") is None and parse_work_size("512") == 512
    with pytest.raises(ValueError, match="native"):
        parse_work_size("big")
    with pytest.raises(ValueError, match="at least"):
        parse_work_size("4")


def test_work_shape_keeps_the_aspect_ratio_on_the_shorter_side():
    assert work_shape(389, 517, 64) == (64, 85)
    assert work_shape(3000, 4000, 512) == (512, 683)
    assert work_shape(389, 517, None) == (389, 517)
    assert work_shape(40, 48, 512) == (40, 48)  # never upscaled
    assert work_shape(512, 700, 512) == (512, 700)


def test_reflection_padding_reaches_a_multiple_of_8_and_tiny_images_replicate():
    x = torch.rand(1, 3, 29, 37)
    padded = pad_to_multiple(x)
    assert padded.shape[-2:] == (32, 40) and torch.equal(padded[..., :29, :37], x)
    assert torch.equal(padded[..., 29, :37], x[..., 27, :])  # reflected, not repeated
    assert pad_to_multiple(torch.rand(1, 3, 3, 2)).shape[-2:] == (8, 8)


@pytest.mark.parametrize("length", [64, 65, 200, 1000, 4000])
def test_tiles_cover_everything_with_at_least_the_overlap(length):
    starts = tile_starts(length, 64, 16)
    assert starts[0] == 0 and starts[-1] + 64 >= length
    assert all(b - a <= 64 - 16 for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("tile", [64, 1024])
def test_balanced_tiles_are_as_few_as_full_ones_and_no_larger_than_needed(tile):
    overlap = 16 if tile == 64 else 64
    for length in range(tile - 8, 4 * tile, 8):
        size = balanced_tile(length, tile, overlap)
        starts = tile_starts(length, size, overlap)
        assert size % 8 == 0 and size <= tile
        assert len(starts) == len(tile_starts(length, tile, overlap))  # no more tiles
        assert starts[-1] + size == length  # covered, overlaps of at least `overlap`
        assert all(b - a <= size - overlap for a, b in itertools.pairwise(starts))
        if size < length:  # 8 px smaller would need another tile
            assert len(tile_starts(length, size - 8, overlap)) > len(starts)
    # just over the tile size: two tiles of about half the length plus the overlap
    assert balanced_tile(tile + 8, tile, overlap) <= (tile + 8 + overlap) / 2 + 8


def test_tiles_blend_without_a_seam_and_stay_within_eps():
    painter = TilePainter()
    steps_seen = []
    x = torch.full((2, 3, 96, 160), 0.5)
    delta = protect_tiled(
        painter, x, tile_size=64, batch_size=4, callback=lambda s, t: steps_seen.append((s, t))
    )
    # 96 px needs two tiles of at most 64 px, and two of 56 already cover it with the overlap
    assert len(painter.shapes) > 1 and all(shape[-2:] == (56, 64) for shape in painter.shapes)
    assert delta.abs().max() <= EPS + 1e-6
    assert delta[0].amax() > 0.9 * EPS and delta[0].amin() < -0.9 * EPS  # both tiles' signs show
    # a cross-fade over the overlap: neighbouring pixels differ by a fraction of the +-eps jump
    assert delta.diff(dim=-1).abs().max() < 2 * EPS / 8
    assert delta.diff(dim=-2).abs().max() < 2 * EPS / 8
    assert steps_seen[-1][0] == steps_seen[-1][1] == 2 * len(painter.shapes)


def test_work_size_resizes_the_perturbation_not_the_image():
    painter = TilePainter()
    image = torch.rand(3, 389, 517) * 0.5 + 0.25
    (protected,) = protect_at_work_size(painter, [image], work_size=64)
    assert painter.shapes == [(1, 3, 64, 88)]  # 64 x 85, padded to a multiple of 8
    assert protected.shape == image.shape
    assert torch.allclose(protected - image, torch.full_like(image, EPS), atol=1e-6)


def test_images_of_different_sizes_share_a_batch_when_their_work_shape_matches():
    painter = TilePainter()
    images = [torch.rand(3, 750, 1000), torch.rand(3, 751, 1001)]
    results = protect_at_work_size(painter, images, work_size=64, batch_size=2)
    assert len(painter.shapes) == 1 and painter.shapes[0][0] == 2
    assert [r.shape for r in results] == [i.shape for i in images]
    with pytest.raises(ValueError, match="one padded work shape"):
        protect_at_work_size(painter, [torch.rand(3, 64, 64), torch.rand(3, 64, 128)], work_size=64)


def test_images_whose_work_shapes_pad_alike_share_a_batch_and_each_keeps_its_own():
    """16x20 and 16x21 both pad to 16x24 (as the runner groups them): each image is protected as
    it would be alone, and gets a perturbation of its own size back."""
    images = [torch.rand(3, 16, 20, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    images[1] = torch.cat([images[1], images[1][..., -1:]], dim=-1)  # 16x21
    together = protect_at_work_size(NoiseEngine(), images, work_size=None, batch_size=2)
    alone = [protect_at_work_size(NoiseEngine(), [image], work_size=None)[0] for image in images]
    for joint, single, image in zip(together, alone, images, strict=True):
        assert joint.shape == image.shape
        torch.testing.assert_close(joint, single, rtol=0, atol=0)


def test_real_engine_on_an_odd_native_size_and_in_tiles_stays_within_eps(tiny_model):
    protector = Protector(tiny_model, "encoder", eps=EPS, step_size=4 / 255, steps=2)
    generator = torch.Generator().manual_seed(21)
    odd = torch.randint(0, 256, (3, 29, 37), generator=generator) / 255  # the 8-bit grid
    (native,) = protect_at_work_size(protector, [odd], work_size=None)
    assert native.shape == odd.shape
    tiled_input = torch.randint(0, 256, (3, 72, 104), generator=generator) / 255
    (tiled,) = protect_at_work_size(protector, [tiled_input], work_size=None, tile_size=64)
    for result, clean in ((native, odd), (tiled, tiled_input)):
        saved = quantize_within_budget(result, clean, EPS, 255)
        assert (saved - clean).abs().max() <= EPS + 1e-6
        assert (saved - clean).abs().amax() > 0
