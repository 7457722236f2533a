"""Reading and writing image files: every mode, orientation, metadata, bad files, atomic saves."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
from conftest import IMAGES, requires_assets
from image_cases import MAKE, bad_files, cmyk_jpeg, cmyk_profile, edge_case_folder, noise
from PIL import Image, ImageCms, ImageOps

from mimicshield.images import (
    IMAGE_SUFFIXES,
    ImageFileError,
    load_image,
    orient,
    plan_output,
    probe_image,
    remove_partial_files,
    save_image,
    to_array,
    write_atomically,
)
from mimicshield.metadata import DMI_PROHIBITED_AIML, PROVENANCE_NOTE, merge_xmp

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
        with pytest.raises(ImageFileError, match="too many pixels"):
            probe_image(path)


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
    assert remove_partial_files(tmp_path / "out") == [stale] and destination.exists()
    assert users_own.exists()


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
