"""Protecting files: modes and sizes kept, bad files isolated, resume, no file ever lost."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, requires_assets
from fake_engines import NoiseEngine, SmallCardEngine
from image_cases import GPS_IFD, MAKE, bad_files, edge_case_folder, noise, private_jpeg
from PIL import Image

from mimicshield.images import load_image
from mimicshield.protector import Protector
from mimicshield.runner import (
    LOCK_NAME,
    MANIFEST_NAME,
    OutputOptions,
    collect_inputs,
    load_manifest,
    protect_files,
    settings_id,
)

EPS = 8 / 255
NATIVE = OutputOptions(work_size=None)
HEADER = {"model": "tiny"}


@pytest.fixture
def engine() -> NoiseEngine:
    """A free stand-in engine (+-eps noise): these tests are about files, not the attack."""
    return NoiseEngine(eps=EPS)


@pytest.fixture(scope="module")
def protector(tiny_model) -> Protector:
    """The encoder attack on the tiny VAE: the cheapest real engine, two steps."""
    return Protector(tiny_model, "encoder", eps=EPS, step_size=4 / 255, steps=2)


def run(folder, out, engine, **kwargs):
    files, missing = collect_inputs([str(folder)], exclude=out)
    kwargs.setdefault("options", NATIVE)
    report = protect_files(files, out, engine, manifest_header=HEADER, **kwargs)
    return report, {r.relative: r for r in report.results}


def read_png16(path) -> np.ndarray:
    """A 16-bit PNG's pixels with OpenCV (Pillow reads 16-bit colour at 8 bits)."""
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def linf_levels(before, after) -> int:
    return int(np.abs(before.astype(np.int64) - after.astype(np.int64)).max())


def test_every_mode_comes_out_with_its_size_mode_alpha_and_profile(tmp_path, engine):
    import tifffile

    cases = edge_case_folder(tmp_path / "in")
    report, by_name = run(tmp_path / "in", tmp_path / "out", engine)
    assert not report.failures, [r.error for r in report.failures]
    out = tmp_path / "out"
    budget_8, budget_16 = int(EPS * 255), int(EPS * 65535)

    rgb = Image.open(out / "odd_37x29.png")
    assert (rgb.mode, rgb.size) == ("RGB", (37, 29))  # native, odd size: padded and cropped back
    assert rgb.info["icc_profile"] == Image.open(cases["rgb"]).info["icc_profile"]
    assert 0 < linf_levels(pixels(cases["rgb"]), np.asarray(rgb)) <= budget_8

    for name, mode in (("rgba", "RGBA"), ("grey_alpha", "LA"), ("palette", "RGBA")):
        saved = Image.open(out / cases[name].name)
        assert saved.mode == mode, name
        source = Image.open(cases[name]).convert(mode)
        assert np.array_equal(np.asarray(saved)[..., -1], np.asarray(source)[..., -1]), name
        assert linf_levels(np.asarray(source), np.asarray(saved)) <= budget_8

    grey = Image.open(out / "scan.png")
    assert grey.mode == "L" and linf_levels(pixels(cases["grey"]), pixels(out / "scan.png")) > 0

    grey16 = Image.open(out / "grey16.png")
    assert grey16.mode == "I;16" and by_name["grey16.png"].bits == 16
    assert 0 < linf_levels(pixels(cases["grey16"]), np.asarray(grey16)) <= budget_16

    deep = tifffile.imread(out / "deep.tif")  # 16-bit colour: a 16-bit TIFF, not an 8-bit PNG
    assert deep.dtype == np.uint16 and deep.shape == (24, 32, 3)
    assert linf_levels(tifffile.imread(cases["rgb48"]), deep) <= budget_16
    assert by_name["deep.tif"].output == "deep.tif"

    for name, channels in (("rgb48_png", 3), ("rgba64_png", 4)):  # 16-bit colour PNG: stays so
        before, after = read_png16(cases[name]), read_png16(out / cases[name].name)
        assert after.dtype == np.uint16 and after.shape == (24, 32, channels), name
        assert 0 < linf_levels(before, after) <= budget_16
        assert np.any(after % 257), name  # values between the 8-bit levels: not reduced
        assert np.array_equal(after[..., 3:], before[..., 3:])  # alpha, bit for bit
        assert by_name[cases[name].name].bits == 16
    with Image.open(out / "deep48.png") as deep48:
        assert deep48.info["icc_profile"] == Image.open(cases["rgb48_png"]).info["icc_profile"]

    phone = Image.open(out / "phone.png")  # JPEG in, PNG out, upright, EXIF kept
    assert phone.size == (24, 40) and phone.getexif()[MAKE] == "TestCam"
    assert 0x0112 not in phone.getexif()

    printed = Image.open(out / "print.png")
    assert printed.mode == "RGB" and "CMYK" in by_name["print.jpg"].note

    for result in report.results:
        assert result.status == "protected" and result.linf_255 <= 8 + 1e-4
        # without float32 noise (2.000007): 8-bit files differ by whole levels, 16-bit by 4 places
        assert result.linf_255 == round(result.linf_255, 4)
        assert result.bits == 16 or float(result.linf_255).is_integer()
    entries = load_manifest(out)["images"]
    assert {e["relative"] for e in entries} == {p.name for p in cases.values()}


def test_bad_files_each_fail_with_one_line_and_the_rest_is_protected(tmp_path, engine):
    bad = bad_files(tmp_path / "in")
    Image.fromarray(noise(24, 32)).save(tmp_path / "in" / "good.png")
    report, by_name = run(tmp_path / "in", tmp_path / "out", engine)
    assert by_name["good.png"].status == "protected"
    assert {r.relative for r in report.failures} == {p.name for p in bad.values()}
    for failure in report.failures:
        assert failure.error.startswith(str(tmp_path / "in")) and "\n" not in failure.error
    assert (tmp_path / "out" / "good.png").is_file()
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != LOCK_NAME)
    assert written == ["good.png", MANIFEST_NAME]
    # the lock file stays, unlocked; filelock removes it on release on Windows
    assert (tmp_path / "out" / LOCK_NAME).is_file() or sys.platform == "win32"


@pytest.mark.parametrize("size", [(1, 1), (5, 40)])
def test_images_smaller_than_the_ssim_window_are_protected_without_an_ssim(tmp_path, engine, size):
    """A thumbnail or an icon is protected like any image; SSIM's 11-pixel window does not fit,
    so its SSIM is null (before, the error stopped the whole batch)."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(*size, seed=2)).save(folder / "tiny.png")
    Image.fromarray(noise(24, 32)).save(folder / "normal.png")
    report, by_name = run(folder, tmp_path / "out", engine)
    assert not report.failures
    assert by_name["tiny.png"].ssim is None and by_name["normal.png"].ssim > 0
    assert np.asarray(Image.open(tmp_path / "out" / "tiny.png")).shape[:2] == size
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert {e["output"]: e["ssim"] for e in manifest["images"]}["tiny.png"] is None


def test_an_unchanged_image_is_written_as_strict_json_and_read_back(tmp_path, protector):
    """PSNR is +inf for an image the protection leaves unchanged (0 steps): the manifest says
    "inf", which jq and browsers read (Python's Infinity is not JSON), and a rerun reads it back."""
    from dataclasses import replace

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(24, 32)).save(folder / "same.png")
    unchanged = copy.copy(protector)
    unchanged.config = replace(protector.config, steps=0, random_start=False)
    report, by_name = run(folder, tmp_path / "out", unchanged)
    assert by_name["same.png"].psnr == float("inf")
    text = (tmp_path / "out" / MANIFEST_NAME).read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    manifest = json.loads(text, parse_constant=refuse)
    assert manifest["images"][0]["psnr"] == "inf"
    _, again = run(folder, tmp_path / "out", unchanged)
    assert again["same.png"].status == "skipped" and again["same.png"].psnr == float("inf")


def test_odd_size_at_a_small_work_size_keeps_the_full_resolution(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    original = noise(389, 517, seed=11)
    Image.fromarray(original).save(folder / "photo.jpg", quality=100)
    options = OutputOptions(work_size=32)
    report, by_name = run(folder, tmp_path / "out", engine, options=options)
    saved = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    decoded = np.asarray(Image.open(folder / "photo.jpg"))
    assert saved.shape == (389, 517, 3)
    assert 0 < linf_levels(decoded, saved) <= 8
    assert by_name["photo.jpg"].width == 517 and by_name["photo.jpg"].height == 389


class Interrupt:
    """Presses Ctrl-C during the engine steps of the ``at``-th batch."""

    def __init__(self, at: int) -> None:
        self.at, self.batches = at, 0

    def start(self, item, count) -> None:
        self.batches += 1

    def step(self, step, total) -> None:
        if self.batches == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, engine):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(noise(24, 32, seed=20 + i)).save(folder / f"img{i}.png")
    interrupt = Interrupt(at=2)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, engine, batch_size=2, on_image_start=interrupt.start,
            on_step=interrupt.step)  # fmt: skip
    done = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    assert done == ["img0.png", "img1.png", MANIFEST_NAME]  # the first batch, whole
    first = {name: (out / name).read_bytes() for name in done[:2]}
    (out / ".img2.png.deadbeef.part").write_bytes(b"left by a killed run")

    report, by_name = run(folder, out, engine, batch_size=2)
    assert [by_name[f"img{i}.png"].status for i in range(4)] == ["skipped"] * 2 + ["protected"] * 2
    assert all((out / name).read_bytes() == data for name, data in first.items())
    assert not list(out.glob("*.part")) and not list(out.glob(".*.part"))
    entries = {e["relative"]: e for e in load_manifest(out)["images"]}
    assert set(entries) == {f"img{i}.png" for i in range(4)}


def test_the_manifest_keeps_earlier_files_and_notices_changes(tmp_path, engine):
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.fromarray(noise(24, 32, seed=30)).save(folder / "a" / "x.png")
    Image.fromarray(noise(24, 32, seed=31)).save(folder / "b" / "y.png")
    protect_files(collect_inputs([str(folder)])[0][:1], out, engine, options=NATIVE,
                  manifest_header=HEADER)  # fmt: skip
    run(folder, out, engine)
    manifest = load_manifest(out)
    assert {e["relative"] for e in manifest["images"]} == {"a/x.png", "b/y.png"}
    assert (out / "a" / "x.png").is_file() and (out / "b" / "y.png").is_file()  # mirrored

    # an edited input is not skipped: its old output is stale
    Image.fromarray(noise(24, 32, seed=32)).save(folder / "a" / "x.png")
    _, by_name = run(folder, out, engine, overwrite=False)
    assert by_name["a/x.png"].status == "failed" and "--overwrite" in by_name["a/x.png"].error
    assert by_name["b/y.png"].status == "skipped"

    # other settings: refused without --overwrite, redone with it
    stronger = NoiseEngine(eps=16 / 255)
    before = load_manifest(out)["images"]
    _, by_name = run(folder, out, stronger)
    assert "different settings" in by_name["b/y.png"].error
    # the refusal wrote nothing: the earlier command still finds its outputs done
    assert load_manifest(out)["images"] == before
    _, by_name = run(folder, out, engine)
    assert by_name["b/y.png"].status == "skipped"
    _, by_name = run(folder, out, stronger, overwrite=True)
    assert {r.status for r in by_name.values()} == {"protected"}


def test_strip_metadata_is_part_of_the_settings_so_outputs_are_not_reused(tmp_path, engine):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    private_jpeg(folder / "photo.jpg")
    run(folder, out, engine)
    assert Image.open(out / "photo.png").getexif().get_ifd(GPS_IFD)  # kept by default

    # the output holding the GPS must not be skipped as done: refused, then redone stripped
    stripped = OutputOptions(work_size=None, strip_metadata=True)
    _, by_name = run(folder, out, engine, options=stripped)
    assert "different settings" in by_name["photo.jpg"].error
    _, by_name = run(folder, out, engine, options=stripped, overwrite=True)
    assert by_name["photo.jpg"].status == "protected"
    saved = Image.open(out / "photo.png")
    assert not saved.getexif()
    assert saved.info["icc_profile"] == load_image(folder / "photo.jpg").icc_profile
    assert load_manifest(out)["options"]["strip_metadata"] is True
    assert settings_id(engine, NATIVE, HEADER) != settings_id(engine, stripped, HEADER)


def test_never_overwrites_an_input(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(24, 32)).save(folder / "art.png")
    before = (folder / "art.png").read_bytes()
    files, _ = collect_inputs([str(folder)])
    report = protect_files(files, folder, engine, options=NATIVE)
    assert "would overwrite an input" in report.failures[0].error
    assert (folder / "art.png").read_bytes() == before


def test_two_inputs_with_one_output_name_do_not_overwrite_each_other(tmp_path, engine):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(noise(24, 32)).save(tmp_path / sub / "same.png")
    files, _ = collect_inputs([str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png")])
    report = protect_files(files, tmp_path / "out", engine, options=NATIVE)
    assert len(report.failures) == 1 and "same output name" in report.failures[0].error


def test_equal_working_sizes_share_batches(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (height, width) in enumerate([(24, 32), (29, 37), (24, 32), (24, 32)]):
        Image.fromarray(noise(height, width, seed=40 + i)).save(folder / f"img{i}.png")
    batches = []
    run(folder, tmp_path / "out", engine, batch_size=2,
        on_image_start=lambda item, count: batches.append((item.path.name, count)))  # fmt: skip
    assert batches == [("img0.png", 2), ("img3.png", 1), ("img1.png", 1)]


def test_a_batch_that_runs_out_of_memory_is_split_and_every_image_protected(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(noise(24, 32, seed=60 + i)).save(folder / f"img{i}.png")
    _, plain = run(folder, tmp_path / "one", engine, batch_size=1)
    small = SmallCardEngine(fits=2, eps=EPS)
    report, split = run(folder, tmp_path / "split", small, batch_size=5)
    assert not report.failures
    assert [shape[0] for shape in small.shapes] == [5, 2, 3, 1, 2]  # 5 -> 2 + 3 -> 2 + 1 + 2
    for name in plain:
        np.testing.assert_array_equal(
            pixels(tmp_path / "split" / name), pixels(tmp_path / "one" / name)
        )

    one_at_a_time = SmallCardEngine(fits=0, eps=EPS)  # even one image does not fit
    report, _ = run(folder, tmp_path / "none", one_at_a_time, batch_size=2)
    assert len(report.failures) == 5
    assert all("out of memory" in result.error for result in report.failures)


def test_batch_size_can_depend_on_the_work_shape(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (height, width) in enumerate([(24, 32), (24, 32), (40, 48), (40, 48)]):
        Image.fromarray(noise(height, width, seed=70 + i)).save(folder / f"img{i}.png")
    asked = []

    def by_shape(height: int, width: int) -> int:
        asked.append((height, width))
        return 2 if height * width < 40 * 48 else 1

    run(folder, tmp_path / "out", engine, batch_size=by_shape)
    assert sorted(shape[0] for shape in engine.shapes) == [1, 1, 2]
    assert len(asked) == 2  # once per work shape


def test_jpeg_output_is_lossy_and_measured_on_the_decoded_file(tmp_path, engine):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(24, 32)).save(folder / "photo.png")
    Image.fromarray(noise(24, 32, 4)).save(folder / "sticker.png")
    options = OutputOptions(work_size=None, file_format="jpeg", quality=90)
    report, by_name = run(folder, tmp_path / "out", engine, options=options)
    assert Image.open(tmp_path / "out" / "photo.jpg").format == "JPEG"
    decoded = pixels(tmp_path / "out" / "photo.jpg")
    measured = linf_levels(pixels(folder / "photo.png"), decoded)
    assert by_name["photo.png"].linf_255 == pytest.approx(measured)
    assert "transparency" in by_name["sticker.png"].error


def test_folders_are_read_recursively_without_the_output_or_hidden_files(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for path in (folder / "a.png", folder / "sub" / "b.jpg", folder / ".cache" / "c.png"):
        Image.fromarray(noise(8, 8)).save(path)
    (folder / "protected").mkdir()
    Image.fromarray(noise(8, 8)).save(folder / "protected" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    arguments = [str(folder), str(tmp_path / "nope*.png")]
    files, missing = collect_inputs(arguments, exclude=folder / "protected")
    assert sorted(f.relative.as_posix() for f in files) == ["a.png", "sub/b.jpg"]
    assert len(missing) == 1 and "nope*.png: the pattern matches no file." in missing[0].error
    pattern = str(folder / "**" / "*.png")
    assert len(collect_inputs([pattern], exclude=folder / "protected")[0]) == 1
    # a pattern's matches keep their folders below its literal part, as a folder's files do
    (found,), _ = collect_inputs([str(folder / "**" / "*.jpg")])
    assert found.relative.as_posix() == "sub/b.jpg"
    # -o pointing at the input folder itself: the inputs are still found (and then protected
    # beside themselves only where that overwrites nothing)
    assert len(collect_inputs([str(folder)], exclude=folder)[0]) == 3


@requires_assets
def test_real_images_keep_size_alpha_grey_and_profile(tmp_path, protector):
    folder = tmp_path / "in"
    folder.mkdir()
    names = {
        "artwork/monet_woman_with_parasol_rgba.png": "RGBA",
        "portrait/camera_gray.png": "L",
        "landscape/forest_path.png": "RGB",
        "landscape/lake_boats_evening_glow.jpg": "RGB",
    }
    for name in names:
        shutil.copy(IMAGES / name, folder / name.split("/")[1])
    report, by_name = run(folder, tmp_path / "out", protector, options=OutputOptions(work_size=32))
    assert not report.failures
    for name, mode in names.items():
        source = IMAGES / name
        output = tmp_path / "out" / by_name[source.name].output
        saved, original = Image.open(output), Image.open(source)
        assert saved.size == original.size and saved.mode == mode
        assert saved.info.get("icc_profile") == original.info.get("icc_profile")
        assert 0 < linf_levels(np.asarray(original), np.asarray(saved)) <= 8
        if mode == "RGBA":
            assert np.array_equal(np.asarray(saved)[..., 3], np.asarray(original)[..., 3])
    loaded = load_image(tmp_path / "out" / "camera_gray.png")
    assert loaded.grey
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["options"]["work_size"] == 32 and manifest["settings"]


def test_from_python_paths_are_accepted_and_the_manifest_tells_models_apart(
    tmp_path, tiny_model, protector
):
    """Called with plain paths and no header, as from a notebook: it still resumes, and only
    when the model and settings are the same."""
    art = tmp_path / "art.png"
    Image.fromarray(noise(24, 32)).save(art)
    out = tmp_path / "out"
    first = protect_files([str(art)], out, protector, options=NATIVE)
    assert [r.status for r in first.results] == ["protected"]
    assert load_manifest(out)["model"] == tiny_model.name  # one model as the CLI records it
    again = protect_files([art], out, protector, options=NATIVE)
    assert [r.status for r in again.results] == ["skipped"]
    other = copy.copy(tiny_model)
    other.name = "another-model"
    changed = Protector(other, "encoder", eps=EPS, step_size=4 / 255, steps=2)
    refused = protect_files([art], out, changed, options=NATIVE)
    assert refused.results[0].status == "failed", refused.results  # another model
    assert "different settings" in refused.results[0].error, refused.results[0].error


def test_a_folder_holding_two_runs_settings_describes_both(tmp_path):
    """A resumed folder may keep outputs of an earlier run with other settings: the manifest's
    top level is the latest run, and ``runs`` holds the settings each entry names."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name, seed in (("a.png", 40), ("b.png", 41)):
        Image.fromarray(noise(16, 16, seed=seed)).save(folder / name)
    files = collect_inputs([str(folder)])[0]
    weak, strong = NoiseEngine(eps=4 / 255), NoiseEngine(eps=12 / 255)
    protect_files(files[:1], out, weak, options=NATIVE)
    report = protect_files(files[1:], out, strong, options=NATIVE)

    manifest = load_manifest(out)
    runs = {run["settings"]: run for run in manifest["runs"]}
    assert len(runs) == 2 and manifest["runs"][-1]["settings"] == manifest["settings"]
    assert manifest["parameters"]["eps"] == strong.config.eps  # the top level: the latest run
    for entry in manifest["images"]:
        made_by = weak if entry["relative"] == "a.png" else strong
        assert runs[entry["settings"]]["parameters"]["eps"] == made_by.config.eps
    assert any("2 different settings" in note for note in report.notes)

    # a manifest from before "runs" still resumes, its header taken as its run
    del manifest["runs"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = protect_files(files[1:], out, strong, options=NATIVE)
    assert [r.status for r in report.results] == ["skipped"]
    assert [run["settings"] for run in load_manifest(out)["runs"]] == [manifest["settings"]]

    # once every output is redone with one settings, the manifest describes that one alone
    report = protect_files(files, out, strong, options=NATIVE, overwrite=True)
    assert {r.status for r in report.results} == {"protected"} and not report.notes
    assert [run["settings"] for run in load_manifest(out)["runs"]] == [manifest["settings"]]


def test_evaluate_labels_a_folder_resumed_with_another_method_by_both(tmp_path):
    """``evaluate`` names a protected folder by its manifest's method; one that holds images
    of two methods (a resumed run with another method) is named by both, not the last alone."""
    from mimicshield.evaluation import pair_folders

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name, seed in (("a.png", 40), ("b.png", 41)):
        Image.fromarray(noise(16, 16, seed=seed)).save(folder / name)
    files = collect_inputs([str(folder)])[0]
    protect_files(files[:1], out, NoiseEngine(method="sds-"), options=NATIVE)
    assert [m.name for m in pair_folders(folder, [out])[1]] == ["sds-"]
    protect_files(files[1:], out, NoiseEngine(method="mist"), options=NATIVE)
    assert [m.name for m in pair_folders(folder, [out])[1]] == ["sds- + mist"]


def test_a_run_whose_every_file_failed_is_not_described_as_one_the_folder_holds(tmp_path):
    """The manifest's ``runs`` (and evaluate's label) name the runs whose outputs the folder
    holds: a later run with another method whose every file failed made none."""
    from mimicshield.evaluation import pair_folders

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(noise(16, 16, seed=40)).save(folder / "a.png")
    protect_files(collect_inputs([str(folder)])[0], out, NoiseEngine(method="sds-"), options=NATIVE)
    (folder / "c.png").write_bytes(b"not an image")
    files = collect_inputs([str(folder)])[0]
    report = protect_files(files, out, NoiseEngine(method="mist"), options=NATIVE)
    assert {r.status for r in report.results} == {"failed"}, report.results
    manifest = load_manifest(out)
    assert [run["parameters"]["method"] for run in manifest["runs"]] == ["sds-"]
    assert [m.name for m in pair_folders(folder, [out])[1]] == ["sds-"]


def test_a_link_to_a_file_also_given_is_one_input_under_the_real_name_with_a_note(tmp_path):
    """``link.png -> rgb.png`` in one folder: before, the link's name (first in order) was
    kept and ``rgb.png`` got no output, silently."""
    from mimicshield.runner import scan_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "rgb.png")
    (folder / "link.png").symlink_to(folder / "rgb.png")
    scan = scan_inputs([str(folder)])
    assert [item.relative for item in scan.files] == [Path("rgb.png")]
    [note] = scan.notes
    assert "link.png is the same file as" in note and note.endswith("rgb.png.")
    again = scan_inputs([str(folder / "rgb.png"), str(folder / "rgb.png")])
    assert len(again.files) == 1 and not again.notes  # named twice: nothing to explain


def test_an_image_the_protection_leaves_unchanged_says_so(tmp_path):
    """A 1x1 image came back "protected" with L-infinity 0 and no note."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (4, 4), (100, 120, 140)).save(folder / "flat.png")
    Image.fromarray(noise(16, 16)).save(folder / "noisy.png")
    _, results = run(folder, tmp_path / "nothing", NoiseEngine(eps=0.0, steps=1, seed=0))
    assert results["flat.png"].linf_255 == 0
    assert "no pixel changed" in results["flat.png"].note
    _, results = run(folder, tmp_path / "some", NoiseEngine(eps=4 / 255, steps=1, seed=0))
    assert all("no pixel changed" not in (r.note or "") for r in results.values())
