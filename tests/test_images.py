"""Reading and writing image files: every mode, orientation, metadata, bad files, atomic saves."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import IMAGES, requires_assets
from image_cases import (
    ARTIST,
    COPYRIGHT,
    CREATOR_XMP,
    GPS_IFD,
    MAKE,
    WHITE_POINT,
    bad_files,
    cmyk_jpeg,
    cmyk_profile,
    edge_case_folder,
    noise,
    png16,
    private_exif,
    private_jpeg,
    srgb,
    tiff16,
)
from PIL import Image, ImageCms, ImageOps

from mimicshield.images import (
    IMAGE_SUFFIXES,
    ImageFileError,
    ReadOnlyFileError,
    load_image,
    orient,
    plan_output,
    probe_image,
    remove_partial_files,
    save_image,
    to_array,
    write_atomically,
)
from mimicshield.metadata import DMI_PROHIBITED_AIML, PROVENANCE_NOTE, clean_exif, merge_xmp

requires_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool not installed (Debian: libimage-exiftool-perl; scripts/install-test-deps.sh)",
)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return edge_case_folder(tmp_path_factory.mktemp("cases"))


def exiftool(path) -> dict:
    output = subprocess.run(
        ["exiftool", "-j", "-n", "-G1", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output)[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation):
    image = Image.fromarray(noise(5, 7))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
    assert np.array_equal(orient(np.asarray(image), orientation), expected)


def test_rotated_jpeg_is_loaded_upright_and_keeps_exif_without_orientation(cases):
    loaded = load_image(cases["rotated"])
    stored = Image.open(cases["rotated"])
    assert stored.size == (40, 24) and loaded.size == (24, 40)  # orientation 6: turned upright
    assert probe_image(cases["rotated"]).width == 24
    upright = np.asarray(ImageOps.exif_transpose(stored), dtype=np.float32) / 255
    assert torch.allclose(loaded.rgb.permute(1, 2, 0), torch.from_numpy(upright))
    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif[MAKE] == "TestCam" and 0x0112 not in exif


def test_alpha_is_kept_bit_for_bit(cases):
    loaded = load_image(cases["rgba"])
    assert np.array_equal(loaded.alpha, np.asarray(Image.open(cases["rgba"]))[..., 3])
    assert not loaded.grey and loaded.bits == 8


@pytest.mark.parametrize("name", ["grey", "grey_alpha"])
def test_grey_images_are_replicated_and_marked_grey(cases, name):
    loaded = load_image(cases[name])
    assert loaded.grey
    assert torch.equal(loaded.rgb[0], loaded.rgb[1]) and torch.equal(loaded.rgb[0], loaded.rgb[2])
    assert (loaded.alpha is not None) == (name == "grey_alpha")


def test_palette_with_transparency_becomes_rgba_with_a_note(cases):
    loaded = load_image(cases["palette"])
    expected = np.asarray(Image.open(cases["palette"]).convert("RGBA"))
    assert np.array_equal(loaded.alpha, expected[..., 3])
    assert any("palette" in note for note in loaded.notes)


@pytest.mark.parametrize("name", ["grey16", "rgb48"])
def test_sixteen_bit_images_keep_all_65536_levels(cases, name):
    import tifffile

    loaded = load_image(cases[name])
    raw = np.asarray(Image.open(cases[name])) if name == "grey16" else tifffile.imread(cases[name])
    values = (loaded.rgb * 65535).round().to(torch.int64).numpy()
    expected = raw[None] if raw.ndim == 2 else raw.transpose(2, 0, 1)
    assert loaded.bits == 16 and np.array_equal(values[: len(expected)], expected)
    assert probe_image(cases[name]).bits == 16


def test_cmyk_is_converted_through_its_icc_profile(tmp_path):
    path = cmyk_jpeg(tmp_path / "print.jpg")
    loaded = load_image(path)
    stored = Image.open(path)
    managed = ImageCms.profileToProfile(
        stored,
        ImageCms.ImageCmsProfile(io.BytesIO(cmyk_profile())),
        ImageCms.ImageCmsProfile(io.BytesIO(loaded.icc_profile)),  # the sRGB profile it carries
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        outputMode="RGB",
        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
    )
    ours = (loaded.rgb.permute(1, 2, 0).numpy() * 255).round()
    assert np.array_equal(ours, np.asarray(managed, dtype=np.float32))
    naive = np.asarray(stored.convert("RGB"), dtype=np.float32)
    assert np.abs(ours - naive).mean() > 5  # the warm paper white of the profile shows
    profile = ImageCms.ImageCmsProfile(io.BytesIO(loaded.icc_profile))
    assert "sRGB" in ImageCms.getProfileDescription(profile)
    # littleCMS stamps its profiles with the current time; ours carries a fixed date, so a
    # CMYK file protected today and tomorrow gives the same bytes
    assert struct.unpack(">6H", loaded.icc_profile[24:36]) == (2000, 1, 1, 0, 0, 0)


@pytest.mark.parametrize("name", ["zero", "corrupt", "truncated", "not_image", "unsupported"])
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, name):
    path = bad_files(tmp_path)[name]
    with pytest.raises(ImageFileError) as error:
        load_image(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message
    expected = {
        "zero": "0 bytes",
        "corrupt": "not an image",
        "truncated": "truncated",
        "not_image": "not an image",
        "unsupported": "unsupported image mode 'F'",
    }[name]
    assert expected in message


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(noise(40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x40 is over twice the limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageFileError, match="0.01 megapixels") as error:
            probe_image(path)
    assert "MIMICSHIELD_MAX_MEGAPIXELS=0.01" in str(error.value)  # the value that admits it


def test_xmp_merge_keeps_existing_properties_and_the_authors_caption():
    existing = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6">'
        "<dc:creator><rdf:Seq><rdf:li>Ann Artist</rdf:li></rdf:Seq></dc:creator>"
        '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">My cat</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    merged = merge_xmp(existing).decode()
    assert "Ann Artist" in merged and DMI_PROHIBITED_AIML in merged
    assert f"My cat {PROVENANCE_NOTE}" in merged
    assert "Orientation" not in merged
    assert merged.startswith("<?xpacket begin=") and merged.endswith('<?xpacket end="w"?>')
    assert merge_xmp(merged).decode().count(PROVENANCE_NOTE) == 1  # re-protecting: no duplicate

    assert merge_xmp(None, provenance=False) is None
    assert "Orientation" not in merge_xmp(existing, provenance=False).decode()
    assert DMI_PROHIBITED_AIML in merge_xmp(b"<not xml", provenance=True).decode()


def _save_like_the_runner(loaded, destination, file_format="png", provenance=True):
    header = probe_image(loaded.path)
    plan = plan_output(header, file_format)
    destination = destination.with_suffix(plan.suffix)
    save_image(to_array(loaded.rgb, loaded, plan.levels), loaded, destination, plan,
               provenance=provenance)  # fmt: skip
    return destination


@requires_exiftool
@pytest.mark.parametrize("file_format", ["png", "jpeg"])
def test_exiftool_reads_the_provenance_and_the_kept_exif(cases, tmp_path, file_format):
    loaded = load_image(cases["rotated"])
    saved = _save_like_the_runner(loaded, tmp_path / "phone", file_format)
    tags = exiftool(saved)
    assert tags["XMP-plus:DataMining"] == DMI_PROHIBITED_AIML
    assert tags["XMP-dc:Description"] == PROVENANCE_NOTE
    assert tags["IFD0:Make"] == "TestCam"
    assert "IFD0:Orientation" not in tags and "IFD1:ThumbnailOffset" not in tags

    bare = exiftool(_save_like_the_runner(loaded, tmp_path / "bare", file_format, False))
    assert "XMP-plus:DataMining" not in bare and bare["IFD0:Make"] == "TestCam"


@requires_exiftool
def test_exiftool_reads_the_provenance_of_a_16_bit_tiff(cases, tmp_path):
    saved = _save_like_the_runner(load_image(cases["rgb48"]), tmp_path / "deep")
    assert saved.suffix == ".tif"
    assert exiftool(saved)["XMP-plus:DataMining"] == DMI_PROHIBITED_AIML


def test_saved_files_keep_mode_size_icc_and_dpi(cases, tmp_path):
    for name in ("rgb", "rgba", "grey", "grey_alpha", "grey16", "cmyk"):
        loaded = load_image(cases[name])
        saved = Image.open(_save_like_the_runner(loaded, tmp_path / name))
        assert saved.size == loaded.size
        expected_mode = {"grey": "L", "grey_alpha": "LA", "grey16": "I;16", "rgba": "RGBA"}
        assert saved.mode == expected_mode.get(name, "RGB")
        assert saved.info.get("icc_profile") == loaded.icc_profile
    kept = Image.open(tmp_path / "rgb.png")
    assert kept.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert kept.text["Author"] == "Ann Artist"  # PNG text chunks travel too


def read_png16(path) -> np.ndarray:
    """A 16-bit PNG's pixels as stored, RGB(A) order, read with OpenCV (Pillow reduces them)."""
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return array[..., [2, 1, 0, 3][: array.shape[2]]]


def as_8_bit(array: np.ndarray) -> np.ndarray:
    """What an 8-bit reader keeps of 16-bit values, back on the 16-bit scale."""
    return (np.round(array / 257) * 257).astype(np.uint16)


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_png_round_trips_at_16_bits_with_its_metadata(tmp_path, channels):
    icc = srgb()  # made once: a profile carries the second it was created
    stored = png16(
        tmp_path / "deep.png",
        channels=channels,
        icc=icc,
        exif=private_exif(orientation=6),
        text={"Author": "Ann Artist"},
    )
    upright = np.rot90(stored, -1)  # orientation 6
    assert not np.array_equal(stored, as_8_bit(stored))  # the values need all 16 bits

    header, loaded = probe_image(tmp_path / "deep.png"), load_image(tmp_path / "deep.png")
    assert header.bits == 16 and header.deep_colour and header.has_alpha == (channels == 4)
    assert (header.width, header.height) == loaded.size == (24, 32)
    assert loaded.bits == 16 and not loaded.notes
    values = (loaded.rgb * 65535).round().to(torch.int64).numpy().transpose(1, 2, 0)
    assert np.array_equal(values, upright[..., :3])
    if channels == 4:
        assert loaded.alpha.dtype == np.uint16 and np.array_equal(loaded.alpha, upright[..., 3])

    saved = _save_like_the_runner(loaded, tmp_path / "out")
    assert saved.suffix == ".png"
    pixels = read_png16(saved)
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, upright)
    assert not np.array_equal(pixels, as_8_bit(pixels))
    with Image.open(saved) as reopened:
        assert reopened.mode == ("RGBA" if channels == 4 else "RGB")
        assert any(";16" in str(tile[3]) for tile in reopened.tile)  # 16 bits in the file
        assert reopened.info["icc_profile"] == icc
        assert reopened.text["Author"] == "Ann Artist"
        assert DMI_PROHIBITED_AIML in reopened.text["XML:com.adobe.xmp"]
        exif = reopened.getexif()
        assert exif[ARTIST] == "Ann Artist" and 0x0112 not in exif


def test_sixteen_bit_png_colour_key_becomes_16_bit_alpha(tmp_path):
    stored = png16(tmp_path / "keyed.png", 4, 5)
    key = tuple(int(v) for v in stored[1, 2])
    png16(tmp_path / "keyed.png", 4, 5, colour_key=key)  # same pixels, one colour transparent
    loaded = load_image(tmp_path / "keyed.png")
    assert probe_image(tmp_path / "keyed.png").has_alpha
    transparent = np.all(stored == key, axis=-1)
    assert transparent[1, 2] and np.array_equal(loaded.alpha, np.where(transparent, 0, 65535))
    assert read_png16(_save_like_the_runner(loaded, tmp_path / "out")).shape == (4, 5, 4)


@requires_exiftool
def test_exiftool_validates_a_16_bit_png_and_reads_its_metadata(tmp_path):
    png16(tmp_path / "deep.png", channels=4, icc=srgb(), exif=private_exif())
    saved = _save_like_the_runner(load_image(tmp_path / "deep.png"), tmp_path / "out")
    tags = exiftool_validated(saved)
    assert tags["ExifTool:Validate"] == "0 0 0"  # with -n: no errors, warnings or minor ones
    assert tags["PNG:BitDepth"] == 16 and tags["IFD0:Make"] == "TestCam"
    assert tags["XMP-plus:DataMining"] == DMI_PROHIBITED_AIML
    assert tags["ICC_Profile:ProfileDescription"] == "sRGB built-in"


def exiftool_validated(path) -> dict:
    output = subprocess.run(
        ["exiftool", "-j", "-n", "-G1", "-all", "-validate", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output)[0]


def tiff_tags(path) -> dict:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return {tag.code: tag.value for tag in tif.pages[0].tags.values()}


def test_16_bit_tiff_keeps_upright_pixels_and_the_main_exif_tags(tmp_path):
    import tifffile

    stored = tiff16(tmp_path / "deep.tif")
    loaded = load_image(tmp_path / "deep.tif")
    header = probe_image(tmp_path / "deep.tif")
    assert (header.width, header.height) == loaded.size == (24, 32)  # orientation 6
    values = (loaded.rgb * 65535).round().to(torch.int64).numpy().transpose(1, 2, 0)
    assert np.array_equal(values, np.rot90(stored, -1))

    saved = _save_like_the_runner(loaded, tmp_path / "out")
    assert saved.suffix == ".tif"
    assert np.array_equal(tifffile.imread(saved), np.rot90(stored, -1))
    tags = tiff_tags(saved)
    assert tags[ARTIST] == "Ann Artist" and tags[COPYRIGHT] == "(c) Ann Artist"
    assert tags[MAKE] == "TestCam"
    x, y = (Fraction(*pair) for pair in np.reshape(tags[WHITE_POINT], (2, 2)).tolist())
    assert (x, y) == (Fraction(3127, 10000), Fraction(3290, 10000))  # RATIONALs, exact
    assert 0x0112 not in tags and 270 not in tags  # saved upright; tifffile's JSON left behind
    assert tags[34675] == tiff_tags(tmp_path / "deep.tif")[34675]  # the ICC profile
    xmp = bytes(tags[700]).decode()
    assert "Ann Artist" in xmp and DMI_PROHIBITED_AIML in xmp


@pytest.mark.parametrize("compression", ["lzw", "zlib"])
def test_compressed_16_bit_tiffs_are_read_at_16_bits(tmp_path, compression):
    """Scanners and Photoshop write LZW; tifffile needs imagecodecs for it (a dependency)."""
    import tifffile

    pixels = noise(12, 10, 3, seed=8, dtype=np.uint16)
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", compression=compression)
    loaded = load_image(path)
    assert loaded.bits == 16
    values = (loaded.rgb * 65535).round().to(torch.int64).numpy().transpose(1, 2, 0)
    assert np.array_equal(values, pixels)


def test_16_bit_tiff_notes_the_exif_it_cannot_hold(tmp_path):
    tiff16(tmp_path / "deep.tif")
    loaded = load_image(tmp_path / "deep.tif")
    with_gps = dataclasses.replace(loaded, exif=clean_exif(private_exif()))  # as from a phone
    plan = plan_output(probe_image(loaded.path))
    destination = tmp_path / "gps.tif"
    notes = save_image(to_array(with_gps.rgb, with_gps, plan.levels), with_gps, destination, plan)
    tags = tiff_tags(destination)
    assert tags[ARTIST] == "Ann Artist" and GPS_IFD not in tags
    assert len(notes) == 1 and "GPS" in notes[0]
    assert save_image(to_array(loaded.rgb, loaded, plan.levels), loaded, destination, plan) == []


def private_inputs(folder) -> dict:
    """One input per writer, each with EXIF, XMP and text that --strip-metadata must remove."""
    folder.mkdir(parents=True, exist_ok=True)
    private = {"exif": private_exif(), "text": {"Comment": "shot at home"}, "xmp": CREATOR_XMP}
    png16(folder / "deep.png", channels=4, icc=srgb(), **private)
    tiff16(folder / "deep.tif")
    private_jpeg(folder / "photo.jpg")
    return {
        "jpeg": folder / "photo.jpg",
        "png16": folder / "deep.png",
        "tiff16": folder / "deep.tif",
    }


@pytest.mark.parametrize(
    ("name", "file_format"),
    [("jpeg", "png"), ("jpeg", "jpeg"), ("png16", "png"), ("tiff16", "png"), ("tiff16", "jpeg")],
)
def test_strip_metadata_keeps_only_the_icc_profile_size_and_mode(tmp_path, name, file_format):
    source = private_inputs(tmp_path / "in")[name]
    loaded = load_image(source)
    plan = plan_output(probe_image(source), file_format)
    array = to_array(loaded.rgb, loaded, plan.levels)
    kept, stripped = tmp_path / f"kept{plan.suffix}", tmp_path / f"stripped{plan.suffix}"
    save_image(array, loaded, kept, plan)
    save_image(array, loaded, stripped, plan, strip_metadata=True)

    def private(path) -> set[str]:
        found = set()
        if plan.format == "TIFF":
            tags = tiff_tags(path)
            found |= {"artist"} if ARTIST in tags else set()
            xmp = bytes(tags.get(700, b"")).decode()
        else:
            with Image.open(path) as image:
                exif = image.getexif()
                found |= {"artist"} if ARTIST in exif else set()
                found |= {"gps"} if exif.get_ifd(GPS_IFD) else set()
                found |= {"text"} if "Comment" in getattr(image, "text", {}) else set()
                xmp = image.info.get("xmp", b"")
                xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
        found |= {"xmp creator"} if "Ann Artist" in xmp else set()
        return found

    assert private(kept) >= {"artist", "xmp creator"}  # the input did carry them
    assert private(stripped) == set()
    with Image.open(kept) as before, Image.open(stripped) as after:
        assert after.info.get("icc_profile") == before.info.get("icc_profile")
        assert after.info.get("icc_profile") == loaded.icc_profile is not None
        assert (after.size, after.mode) == (before.size, before.mode)
    if plan.format == "TIFF":
        import tifffile

        assert np.array_equal(tifffile.imread(stripped), tifffile.imread(kept))
    else:
        assert np.array_equal(np.asarray(Image.open(stripped)), np.asarray(Image.open(kept)))


def test_jpeg_cannot_hold_transparency(cases):
    with pytest.raises(ImageFileError, match="transparency"):
        plan_output(probe_image(cases["rgba"]), "jpeg")


def test_atomic_write_leaves_nothing_behind_when_interrupted(tmp_path):
    destination = tmp_path / "out" / "image.png"

    def interrupted(temporary):
        temporary.write_bytes(b"half an image")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(destination, interrupted)
    assert list((tmp_path / "out").iterdir()) == []

    write_atomically(destination, lambda temporary: temporary.write_bytes(b"whole"))
    assert destination.read_bytes() == b"whole"
    stale = tmp_path / "out" / ".image.png.0a1b2c3d.part"  # what a killed process leaves
    stale.write_bytes(b"half")
    users_own = tmp_path / "out" / ".download.part"  # not ours to delete
    users_own.write_bytes(b"mine")
    assert remove_partial_files([destination]) == [stale] and destination.exists()
    assert users_own.exists()


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a mode taken from it is told apart."""
    earlier = os.umask(0o027)
    yield 0o027
    os.umask(earlier)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask_027):
    from safetensors.torch import save_file

    weights = tmp_path / "lora_weights.safetensors"  # safetensors writes its files 0600
    write_atomically(weights, lambda part: save_file({"w": torch.zeros(2)}, str(part)))
    with open(tmp_path / "opened", "w"):
        pass
    assert _mode(weights) == _mode(tmp_path / "opened") == 0o666 & ~umask_027

    # replacing a file keeps its mode, as writing it with open() does
    os.chmod(weights, 0o600)
    write_atomically(weights, lambda part: part.write_text("again"))
    assert _mode(weights) == 0o600 and weights.read_text() == "again"


def test_atomic_writes_never_replace_a_read_only_file(tmp_path):
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"mine")
    os.chmod(kept, 0o444)
    with pytest.raises(ReadOnlyFileError, match="kept.png is read-only; not replaced"):
        write_atomically(kept, lambda part: part.write_bytes(b"theirs"))
    assert kept.read_bytes() == b"mine" and list(tmp_path.iterdir()) == [kept]


@requires_assets
def test_every_real_image_loads_with_its_probed_size_and_metadata():
    paths = sorted(p for p in IMAGES.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(paths) >= 10
    for path in paths:
        loaded, header = load_image(path), probe_image(path)
        assert loaded.size == (header.width, header.height) == Image.open(path).size
        assert loaded.rgb.min() >= 0 and loaded.rgb.max() <= 1
    assert load_image(IMAGES / "portrait" / "camera_gray.png").grey
    monet = load_image(IMAGES / "artwork" / "monet_woman_with_parasol_rgba.png")
    assert monet.alpha is not None
    astronaut = load_image(IMAGES / "portrait" / "astronaut_eileen_collins.png")
    assert astronaut.icc_profile and "Comment" in astronaut.info["text"]


@pytest.mark.parametrize("mode", ["L", "I;16", "RGBA", "P"])
def test_an_uncompressed_tiff_stored_rotated_comes_out_upright(tmp_path, mode):
    """Pillow 12 scrambles these modes of an uncompressed TIFF with orientation 5-8; they are
    read as stored (tifffile) and turned upright like every other file."""
    import tifffile

    stored = noise(4, 6, seed=2)[..., 0]  # H 4, W 6
    if mode == "I;16":
        image = Image.frombytes("I;16", (6, 4), (stored.astype("<u2") * 257).tobytes())
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([stored, stored, 255 - stored, stored]), "RGBA")
    else:
        image = Image.fromarray(stored).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "scan.tif"
    image.save(path, exif=exif)
    loaded, header = load_image(path), probe_image(path)
    assert (header.height, header.width) == tuple(loaded.rgb.shape[1:]) == (6, 4)
    as_stored = tifffile.imread(path)
    if mode == "P":  # indices: compare through the palette
        palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
        as_stored = palette[as_stored][..., 0]
    elif mode == "RGBA":
        assert np.array_equal(loaded.alpha, np.rot90(as_stored[..., 3], -1))
        as_stored = as_stored[..., 0]
    levels = 65535 if mode == "I;16" else 255
    values = (loaded.rgb[0] * levels).round().to(torch.int64).numpy()
    assert np.array_equal(values, np.rot90(as_stored, -1))


def test_a_16_bit_grey_png_with_a_transparency_key_keeps_it_as_alpha(tmp_path):
    stored = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    path = tmp_path / "keyed.png"
    Image.frombytes("I;16", (5, 4), stored.astype("<u2").tobytes()).save(path, transparency=3000)
    header, loaded = probe_image(path), load_image(path)
    assert header.has_alpha and header.bits == loaded.bits == 8  # as a 16-bit LA file is read
    assert np.array_equal(loaded.alpha, np.where(stored == 3000, 0, 255))
    saved = _save_like_the_runner(loaded, tmp_path / "out")
    with Image.open(saved) as out:
        assert out.mode == "LA" and np.array_equal(np.asarray(out)[..., 1], loaded.alpha)
