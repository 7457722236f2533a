"""IPTC-IIM (By-line, CopyrightNotice, Keywords) from inputs to outputs, and out with
``strip_metadata``. The inputs' IPTC blocks are built here byte by byte from the specs (IPTC-IIM
4.2 datasets, Photoshop image resources, JPEG APP13), not with the code under test."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from image_cases import noise, png16
from PIL import Image

from mimicshield import images
from mimicshield.images import load_image, plan_output, probe_image, save_image, to_array
from mimicshield.metadata import (
    insert_jpeg_segment,
    iptc_app13,
    iptc_datasets,
    iptc_from_raw_profile,
)

requires_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool not installed (Debian: libimage-exiftool-perl; scripts/install-test-deps.sh)",
)

BY_LINE = "Ann Artist"
COPYRIGHT_NOTICE = "(c) 2026 Ann Artist, all rights reserved"
KEYWORDS = ["landscape", "Fjällräven åsen"]  # the second is not ASCII: UTF-8, declared in 1:90
UTF8_ESCAPE = b"\x1b%G"  # ISO 2022 "UTF-8" designation, IIM's CodedCharacterSet value for it


def dataset(record: int, number: int, value: bytes) -> bytes:
    return struct.pack(">BBBH", 0x1C, record, number, len(value)) + value


def make_iptc() -> bytes:
    """Envelope 1:90 (UTF-8), then 2:80 By-line, 2:116 CopyrightNotice, 2:25 Keywords."""
    return (
        dataset(1, 90, UTF8_ESCAPE)
        + dataset(2, 0, b"\x00\x04")  # RecordVersion 4
        + dataset(2, 80, BY_LINE.encode())
        + dataset(2, 116, COPYRIGHT_NOTICE.encode())
        + b"".join(dataset(2, 25, k.encode()) for k in KEYWORDS)
    )


def photoshop_resource(resource: int, data: bytes, size: int | None = None) -> bytes:
    """One "8BIM" resource with an empty name; ``size`` overrides the stored size (damage)."""
    size = len(data) if size is None else size
    return b"8BIM" + struct.pack(">HHI", resource, 0, size) + data + b"\x00" * (len(data) % 2)


def jpeg_with_app13(path, body: bytes | None) -> None:
    """A JPEG whose APP13 segment (if ``body``) holds ``body`` after "Photoshop 3.0\\0", placed
    right after the APP0 (JFIF) segment."""
    encoded = io.BytesIO()
    Image.fromarray(noise(24, 32)).save(encoded, format="JPEG", quality=95)
    data = encoded.getvalue()
    if body is not None:
        assert data[2:4] == b"\xff\xe0"
        app0_end = 4 + struct.unpack(">H", data[4:6])[0]
        payload = b"Photoshop 3.0\x00" + body
        segment = b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload
        data = data[:app0_end] + segment + data[app0_end:]
    path.write_bytes(data)


def iptc_jpeg(path) -> None:
    # a resolution-info resource first: the IPTC must be found among others, and kept alone
    resources = photoshop_resource(0x03ED, b"\x00" * 16) + photoshop_resource(0x0404, make_iptc())
    jpeg_with_app13(path, resources)


def values(iptc: bytes | None) -> dict[str, object]:
    """By-line, CopyrightNotice and Keywords decoded from IIM bytes (UTF-8, as 1:90 says)."""
    assert iptc is not None
    found = {(r, n): [] for r, n in ((2, 80), (2, 116), (2, 25))}
    for record, number, value in iptc_datasets(iptc):
        found.get((record, number), []).append(value.decode("utf-8"))
    return {"By-line": found[2, 80], "CopyrightNotice": found[2, 116], "Keywords": found[2, 25]}


EXPECTED = {"By-line": [BY_LINE], "CopyrightNotice": [COPYRIGHT_NOTICE], "Keywords": KEYWORDS}


def save_like_the_runner(loaded, destination, file_format="png", strip_metadata=False):
    plan = plan_output(probe_image(loaded.path), file_format)
    destination = destination.with_suffix(plan.suffix)
    array = to_array(loaded.rgb, loaded, plan.levels)
    notes = save_image(array, loaded, destination, plan, strip_metadata=strip_metadata)
    return destination, notes


def exiftool_iptc(path) -> dict:
    output = subprocess.run(
        ["exiftool", "-j", "-IPTC:all", str(path)], capture_output=True, text=True, check=True
    ).stdout
    tags = json.loads(output)[0]
    return {k: v for k, v in tags.items() if k != "SourceFile"}


def png_chunk_keys(path) -> list[bytes]:
    """The keyword of every tEXt / zTXt / iTXt chunk of a PNG, in file order."""
    data, position, keys = path.read_bytes(), 8, []
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keys.append(body.split(b"\x00", 1)[0])
        position += 12 + length
    return keys


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in" / "photo.jpg"
    path.parent.mkdir()
    iptc_jpeg(path)
    return path


def test_a_jpeg_app13_is_read_as_its_iptc_datasets(source):
    loaded = load_image(source)
    assert loaded.iptc == make_iptc()
    assert values(loaded.iptc) == EXPECTED
    assert not loaded.notes


@pytest.mark.parametrize("file_format", ["png", "jpeg"])
def test_iptc_survives_protection_into_png_and_jpeg(source, tmp_path, file_format):
    saved, notes = save_like_the_runner(load_image(source), tmp_path / "out" / "photo", file_format)
    assert not notes
    reloaded = load_image(saved)
    assert values(reloaded.iptc) == EXPECTED
    assert not reloaded.notes
    if file_format == "png":  # one chunk, not also a copy among the PNG text
        assert png_chunk_keys(saved).count(b"Raw profile type iptc") == 1
        assert "Raw profile type iptc" not in reloaded.info.get("text", {})
        again, _ = save_like_the_runner(reloaded, tmp_path / "again" / "photo")
        assert png_chunk_keys(again).count(b"Raw profile type iptc") == 1
    else:
        with Image.open(saved) as image:  # Pillow's own reader finds it, and the EXIF/XMP too
            assert image.info["photoshop"][0x0404] == make_iptc()
            assert "xmp" in image.info


@requires_exiftool
@pytest.mark.parametrize("file_format", ["png", "jpeg"])
def test_exiftool_reads_the_kept_iptc(source, tmp_path, file_format):
    saved, _ = save_like_the_runner(load_image(source), tmp_path / "out" / "photo", file_format)
    tags = exiftool_iptc(saved)
    assert tags["By-line"] == BY_LINE
    assert tags["CopyrightNotice"] == COPYRIGHT_NOTICE
    assert tags["Keywords"] == KEYWORDS


@pytest.mark.parametrize("file_format", ["png", "jpeg"])
def test_strip_metadata_drops_the_iptc(source, tmp_path, file_format):
    saved, _ = save_like_the_runner(
        load_image(source), tmp_path / "out" / "photo", file_format, strip_metadata=True
    )
    assert load_image(saved).iptc is None
    assert b"Photoshop 3.0" not in saved.read_bytes()
    assert b"Raw profile type iptc" not in saved.read_bytes()
    if shutil.which("exiftool"):
        assert exiftool_iptc(saved) == {}


@pytest.mark.parametrize("file_format", ["png", "jpeg"])
def test_a_file_without_iptc_gets_none(tmp_path, file_format):
    path = tmp_path / "plain.jpg"
    jpeg_with_app13(path, None)
    loaded = load_image(path)
    assert loaded.iptc is None
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "plain", file_format)
    assert b"Photoshop 3.0" not in saved.read_bytes()
    assert b"Raw profile type iptc" not in saved.read_bytes()


@pytest.mark.parametrize(
    "body",
    [
        photoshop_resource(0x0404, make_iptc(), size=100_000),  # runs past the segment
        photoshop_resource(0x0404, b"not IIM at all"),
        photoshop_resource(0x0404, make_iptc()[:-3]),  # the last dataset cut short
        b"8BIM\x04",  # a header cut short
    ],
    ids=["size", "not-iim", "truncated", "header"],
)
def test_a_damaged_app13_drops_only_the_iptc_with_a_note(tmp_path, body):
    path = tmp_path / "damaged.jpg"
    jpeg_with_app13(path, body)
    loaded = load_image(path)
    assert loaded.iptc is None
    assert any("damaged IPTC" in note for note in loaded.notes)
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "damaged", "jpeg")
    with Image.open(saved) as image:
        assert image.size == (32, 24)
        assert "photoshop" not in image.info


def test_a_16_bit_png_carries_the_iptc(tmp_path):
    png16(tmp_path / "deep.png")
    loaded = dataclasses.replace(load_image(tmp_path / "deep.png"), iptc=make_iptc())
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "deep")
    assert saved.suffix == ".png"
    reloaded = load_image(saved)
    assert reloaded.bits == 16 and values(reloaded.iptc) == EXPECTED


def long_iptc_tiff(path, pixels: np.ndarray) -> None:
    """A TIFF whose tag 33723 holds the IPTC as LONGs (as some writers store it)."""
    import tifffile

    iptc = make_iptc()
    padded = iptc + b"\x00" * (-len(iptc) % 4)  # LONG values: whole 4-byte words
    longs = struct.unpack(f"<{len(padded) // 4}I", padded)
    tifffile.imwrite(path, pixels, photometric="rgb", extratags=[(33723, 4, len(longs), longs)])


def iptc_tag_warnings(path, *, filtered: bool) -> list[str]:
    """The "tag 33723" warnings load_image issues, recorded with every warning shown (as pytest's
    ``recwarn`` does, which hides the module-level filter), then images' filter re-applied on top
    when ``filtered``: it must match the message, category and module Pillow issues it with."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if filtered:
            images.ignore_false_iptc_warning()
        load_image(path)
    return [str(w.message) for w in caught if "33723" in str(w.message)]


def test_pillows_false_iptc_tag_warning_is_filtered_at_import(tmp_path):
    """Pillow drops a LONG tag 33723 with "had too many entries", but tifffile reads it: the
    warning is false and one module-level filter (no per-read catch_warnings) hides it."""
    source = tmp_path / "long.tif"
    long_iptc_tiff(source, noise(24, 32))  # 8-bit: Pillow decodes it, and reads the tags
    # installed by the import itself; checked in a fresh interpreter, since pytest restores the
    # filters it found after collecting (so the import's filter is gone by the time tests run)
    check = (
        "import sys, warnings, mimicshield.images as m; sys.exit(not any(a == 'ignore' and "
        "c is UserWarning and msg and msg.pattern == m.IPTC_TAG_WARNING and mod and "
        "mod.match('PIL.TiffImagePlugin') for a, msg, c, mod, _ in warnings.filters))"
    )
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0
    assert iptc_tag_warnings(source, filtered=False)  # Pillow does issue it, or this proves nothing
    assert iptc_tag_warnings(source, filtered=True) == []


@pytest.mark.filterwarnings(f"ignore:{images.IPTC_TAG_WARNING}:UserWarning")  # see the test above
def test_a_tiff_tag_33723_stored_as_long_reaches_the_16_bit_tiff_output(tmp_path):
    source = tmp_path / "deep.tif"
    long_iptc_tiff(source, noise(24, 32, 3, dtype=np.uint16))
    loaded = load_image(source)
    assert values(loaded.iptc) == EXPECTED  # the zero padding is allowed after the datasets
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "deep")
    assert saved.suffix == ".tif"
    assert values(load_image(saved).iptc) == EXPECTED
    if shutil.which("exiftool"):
        assert exiftool_iptc(saved)["CopyrightNotice"] == COPYRIGHT_NOTICE
    stripped, _ = save_like_the_runner(loaded, tmp_path / "bare" / "deep", strip_metadata=True)
    assert load_image(stripped).iptc is None


def test_a_png_raw_profile_in_either_form_is_read(tmp_path):
    iptc = make_iptc()
    irb = photoshop_resource(0x0404, iptc)
    for name, data in (("iim", iptc), ("irb", irb)):
        text = f"\niptc\n{len(data):8d}\n" + data.hex() + "\n"
        assert iptc_from_raw_profile(text) == iptc, name
    with pytest.raises(ValueError, match="header says"):
        iptc_from_raw_profile(f"\niptc\n{len(iptc) + 1:8d}\n" + iptc.hex() + "\n")


def png_with_8bim(path, irb: bytes) -> bytes:
    """A PNG with ImageMagick's "Raw profile type 8bim" zTXt chunk holding ``irb``; the chunk."""
    text = f"\n8bim\n{len(irb):8d}\n" + irb.hex() + "\n"
    data = io.BytesIO()
    Image.fromarray(noise(24, 32)).save(data, format="PNG")
    body = b"Raw profile type 8bim\x00\x00" + zlib.compress(text.encode("latin-1"))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + body))
    path.write_bytes(data.getvalue()[:33] + chunk + data.getvalue()[33:])
    return chunk


def test_a_png_8bim_profile_without_iptc_is_copied_byte_for_byte(tmp_path):
    """ImageMagick writes the whole resource list as "Raw profile type 8bim"; resources other
    than IPTC (here 0x040A, the copyright flag) are kept by copying the chunk as it came."""
    chunk = png_with_8bim(tmp_path / "flag.png", photoshop_resource(0x040A, b"\x01"))
    loaded = load_image(tmp_path / "flag.png")
    assert loaded.iptc is None and not loaded.notes
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "flag")
    assert saved.read_bytes().count(chunk) == 1
    assert b"Raw profile type iptc" not in png_chunk_keys(saved)
    stripped, _ = save_like_the_runner(loaded, tmp_path / "bare" / "flag", strip_metadata=True)
    assert b"Raw profile type 8bim" not in png_chunk_keys(stripped)


def test_a_png_8bim_profile_with_iptc_is_copied_and_the_iptc_written_once(tmp_path):
    """The 8bim chunk already carries the IPTC: no second "Raw profile type iptc" chunk."""
    irb = photoshop_resource(0x040A, b"\x01") + photoshop_resource(0x0404, make_iptc())
    chunk = png_with_8bim(tmp_path / "magick.png", irb)
    loaded = load_image(tmp_path / "magick.png")
    assert values(loaded.iptc) == EXPECTED
    saved, _ = save_like_the_runner(loaded, tmp_path / "out" / "magick")
    assert saved.read_bytes().count(chunk) == 1
    assert b"Raw profile type iptc" not in png_chunk_keys(saved)
    assert load_image(saved).iptc == make_iptc()
    if shutil.which("exiftool"):  # -a: duplicates too; each value once, as it went in
        listed = subprocess.run(
            ["exiftool", "-a", "-s3", "-By-line", "-CopyrightNotice", "-Keywords", str(saved)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert listed == [BY_LINE, COPYRIGHT_NOTICE, ", ".join(KEYWORDS)]
    stripped, _ = save_like_the_runner(loaded, tmp_path / "bare" / "magick", strip_metadata=True)
    assert not {b"Raw profile type 8bim", b"Raw profile type iptc"} & set(png_chunk_keys(stripped))
    assert load_image(stripped).iptc is None


def test_a_tiff_tifffile_cannot_read_says_so_instead_of_damaged_iptc(tmp_path, monkeypatch):
    import tifffile

    source = tmp_path / "plain.tif"
    Image.fromarray(noise(24, 32)).save(source)

    def unreadable(*args, **kwargs):
        raise tifffile.TiffFileError("invalid TIFF structure")

    monkeypatch.setattr(tifffile, "TiffFile", unreadable)
    loaded = load_image(source)
    assert loaded.iptc is None
    assert loaded.notes == [
        "IPTC metadata not copied: tifffile could not read the file's tags (invalid TIFF structure)"
    ]
    assert not any("damaged" in note for note in loaded.notes)


def test_iptc_too_big_for_one_jpeg_segment_is_left_out_with_a_note(source, tmp_path):
    big = make_iptc() + b"".join(dataset(2, 120, b"x" * 30_000) for _ in range(3))
    assert iptc_app13(big) is None
    loaded = dataclasses.replace(load_image(source), iptc=big)
    saved, notes = save_like_the_runner(loaded, tmp_path / "out" / "big", "jpeg")
    assert any("IPTC" in note and "64 KB" in note for note in notes)
    with Image.open(saved) as image:
        image.load()
        assert "photoshop" not in image.info
    # a PNG has no such limit
    saved_png, notes = save_like_the_runner(loaded, tmp_path / "out" / "big", "png")
    assert not notes and load_image(saved_png).iptc == big


def test_the_largest_iptc_that_fits_one_segment_is_written(tmp_path):
    # 65533 bytes of segment data at most: 14 ("Photoshop 3.0\0"), 12 (the resource header),
    # the IIM and a pad byte if it is odd; so 65506 bytes fit (two datasets: one holds 32767)
    iptc = dataset(2, 120, b"y" * 32_748) * 2
    assert len(iptc) == 65_506
    segment = iptc_app13(iptc)
    assert segment is not None and struct.unpack(">H", segment[2:4])[0] == 65_534
    assert iptc_app13(iptc + b"\x00") is None  # odd: its pad byte makes 65534
    encoded = io.BytesIO()
    Image.fromarray(noise(8, 8)).save(encoded, format="JPEG")
    spliced = insert_jpeg_segment(encoded.getvalue(), segment)
    with Image.open(io.BytesIO(spliced)) as image:
        image.load()
        assert image.info["photoshop"][0x0404] == iptc
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(encoded)))


def test_insert_jpeg_segment_refuses_what_is_not_a_jpeg():
    with pytest.raises(ValueError, match="not a JPEG"):
        insert_jpeg_segment(b"\x89PNG", b"\xff\xed\x00\x02")


@requires_exiftool
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_iptc_written_by_exiftool_is_read_and_kept(tmp_path, suffix):
    path = tmp_path / f"tagged{suffix}"
    Image.fromarray(noise(24, 32)).save(path)
    tags = [f"-By-line={BY_LINE}", f"-CopyrightNotice={COPYRIGHT_NOTICE}"]
    tags += [f"-Keywords={keyword}" for keyword in KEYWORDS]
    options = ["-q", "-overwrite_original", "-charset", "iptc=UTF8", "-CodedCharacterSet=UTF8"]
    subprocess.run(["exiftool", *options, *tags, str(path)], check=True)
    loaded = load_image(path)
    assert values(loaded.iptc) == EXPECTED
    for file_format in ("png", "jpeg"):
        saved, _ = save_like_the_runner(loaded, tmp_path / file_format / "tagged", file_format)
        assert values(load_image(saved).iptc) == EXPECTED
        assert exiftool_iptc(saved)["Keywords"] == KEYWORDS
