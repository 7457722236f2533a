"""Evaluation: set statistics against their formulas, metric edge cases, files, and the CLI."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WEIGHTS, requires_assets
from PIL import Image
from typer.testing import CliRunner

from mimicshield.cli.main import app
from mimicshield.evaluation import (
    ClipImageEmbedder,
    EvaluationResult,
    InceptionFeatures,
    MetricSuite,
    Record,
    frechet_distance,
    json_number,
    pair_folders,
    precision_recall,
    summarize,
    write_metrics,
)
from mimicshield.metrics import LPIPS
from mimicshield.mimicry import Variant

LPIPS_FILE = WEIGHTS / "lpips_alexnet.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


# --- set statistics ----------------------------------------------------------------------------


def _reference_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD with Tr((S_a S_b)^1/2) from the eigenvalues of the (non-symmetric) product."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    mean = (a.mean(0) - b.mean(0)).pow(2).sum()
    return float(mean + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


@pytest.mark.parametrize(("n_a", "n_b", "dim"), [(5, 7, 12), (40, 30, 4)])
def test_frechet_distance_matches_the_formula(n_a, n_b, dim):
    generator = torch.Generator().manual_seed(n_a)
    a = torch.randn(n_a, dim, generator=generator)
    b = 1.5 * torch.randn(n_b, dim, generator=generator) + 0.3
    assert math.isclose(frechet_distance(a, b), _reference_fd(a, b), rel_tol=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_in_one_dimension_and_degenerate_sets():
    a = torch.tensor([[0.0], [2.0]])  # mean 1, std sqrt(2)
    b = torch.tensor([[3.0], [7.0]])  # mean 5, std sqrt(8)
    expected = (1 - 5) ** 2 + (math.sqrt(2) - math.sqrt(8)) ** 2
    assert math.isclose(frechet_distance(a, b), expected, rel_tol=1e-9)
    assert math.isnan(frechet_distance(a[:1], b))


def test_precision_recall_with_knn_balls():
    real = torch.tensor([[float(i), 0.0] for i in range(6)])
    inside = real + 0.1
    far = real + 100
    assert precision_recall(real, inside, k=2) == (1.0, 1.0)
    assert precision_recall(real, far, k=2) == (0.0, 0.0)
    precision, recall = precision_recall(real[:2], inside, k=2)
    assert math.isnan(precision) and recall == 1.0
    # k counts neighbours other than the point itself: with k=1 the radius of 3 is 2 (to 1),
    # so 4.5 falls inside it and 10 inside none; 6's radius of 3 covers both fakes
    real_1d, fake_1d = torch.tensor([[0.0], [1.0], [3.0], [6.0]]), torch.tensor([[4.5], [10.0]])
    assert precision_recall(real_1d, fake_1d, k=1) == (0.5, 1.0)
    assert precision_recall(real_1d, fake_1d, k=2)[0] == 1.0


# --- records, summaries, files -----------------------------------------------------------------


def test_summary_keeps_infinite_psnr_apart_and_json_stays_valid(tmp_path):
    records = [
        Record("a", "sdedit-ddim", 0.1, "x", "psnr_vs_clean_mimicry", 30.0),
        Record("a", "sdedit-ddim", 0.1, "y", "psnr_vs_clean_mimicry", math.inf),
        Record("clean", "sdedit-ddim", 0.1, "x", "psnr_vs_clean_mimicry", math.inf),
        Record("clean", "sdedit-ddim", 0.1, None, "fd_lpips_alexnet", math.nan),
    ]
    by_source = {s.source + s.metric: s for s in summarize(records)}
    mixed = by_source["apsnr_vs_clean_mimicry"]
    assert (mixed.mean, mixed.n, mixed.n_inf, mixed.all_inf) == (30.0, 2, 1, False)
    assert by_source["cleanpsnr_vs_clean_mimicry"].all_inf
    assert math.isinf(by_source["cleanpsnr_vs_clean_mimicry"].mean)
    assert [json_number(v) for v in (1.5, math.inf, -math.inf, math.nan, None)] == [
        1.5,
        "inf",
        "-inf",
        "nan",
        None,
    ]

    result = EvaluationResult(
        model="tiny", settings={}, sources=[], variants=[Variant("sdedit-ddim", 0.1)]
    )
    result.records = records
    csv_path, json_path = write_metrics(result, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[1]["value"] == "inf" and rows[0]["strength"] == "0.1" and rows[3]["image"] == ""

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    document = json.loads(json_path.read_text(), parse_constant=no_constants)
    assert document["records"][1]["value"] == "inf"
    assert document["scenarios"][0]["key"] == "sdedit-ddim@0.1"
    assert mixed.std is None  # one finite value: no spread to give
    assert all(entry["std"] is None for entry in document["summary"])


def test_summary_std_is_the_sample_standard_deviation_of_the_finite_values():
    values = [0.25, 0.5, 1.0, math.inf]
    records = [Record("a", "sdedit-ddim", 0.1, f"i{k}", "lpips", v) for k, v in enumerate(values)]
    (summary,) = summarize(records)
    finite = values[:3]
    mean = sum(finite) / 3
    expected = math.sqrt(sum((v - mean) ** 2 for v in finite) / (3 - 1))
    assert summary.std == pytest.approx(expected) and summary.mean == pytest.approx(mean)


def _save(tensor: torch.Tensor, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def test_pair_folders_matches_by_relative_path_and_stem(tmp_path):
    image = torch.rand(3, 8, 8)
    _save(image, tmp_path / "clean" / "a.jpg")
    _save(image, tmp_path / "clean" / "sub" / "b.png")
    _save(image, tmp_path / "p1" / "a.png")
    _save(image, tmp_path / "p1" / "sub" / "b.png")
    _save(image, tmp_path / "p2" / "a.png")
    (tmp_path / "p2" / "manifest.json").write_text(json.dumps({"parameters": {"method": "mist"}}))
    clean, methods = pair_folders(tmp_path / "clean", [tmp_path / "p1", tmp_path / "p2"])
    assert sorted(clean.files) == ["a", "sub/b"]
    assert [m.name for m in methods] == ["p1", "mist"]
    assert sorted(methods[0].files) == ["a", "sub/b"] and methods[1].missing == ["sub/b"]
    with pytest.raises(ValueError, match="none of its images"):
        pair_folders(tmp_path / "p2", [tmp_path / "clean" / "sub"])

    # a.png beside a.jpg: one key, so the first in sorted order (the one protect protected)
    # is kept and the other is reported, not silently dropped
    _save(image, tmp_path / "clean" / "a.png")
    clean, _ = pair_folders(tmp_path / "clean", [tmp_path / "p1"])
    assert clean.files["a"].name == "a.jpg"
    assert [(a.name, b.name) for a, b in clean.ambiguous] == [("a.png", "a.jpg")]
    # a manifest.json that is not a JSON object names no method (it used to raise)
    (tmp_path / "p2" / "manifest.json").write_text("[1, 2]")
    assert [m.name for m in pair_folders(tmp_path / "clean", [tmp_path / "p2"])[1]] == ["p2"]


def test_folders_of_one_method_are_all_told_apart_by_folder_name():
    from mimicshield.evaluation import distinct_labels

    folders = [Path("runs/e8"), Path("runs/e16"), Path("other"), Path("x/e8")]
    labels = ["sds-", "sds-", "mist", "sds-"]
    # the two e8 folders share a name too: their paths tell them apart
    assert distinct_labels(labels, folders) == ["runs/e8", "sds- (e16)", "mist", "x/e8"]
    assert distinct_labels(["sds-", "mist"], folders[:2]) == ["sds-", "mist"]
    assert distinct_labels(["clean"], [Path("c")]) == ["clean (c)"]  # never the clean column's


# --- metric models -----------------------------------------------------------------------------


@requires_assets
def test_identical_images_give_zero_lpips_and_infinite_psnr():
    suite = MetricSuite(LPIPS.from_file(LPIPS_FILE))
    image = torch.rand(3, 32, 32)
    values = suite.compare(image, image)
    assert values["lpips"] == 0.0 and math.isinf(values["psnr"]) and values["ssim"] == 1.0
    assert suite.set_metrics([image, image.flip(1)], [image, image.flip(1)])[
        "fd_lpips_alexnet"
    ] == pytest.approx(0.0, abs=1e-6)


@requires_assets
def test_lpips_weights_for_users_convert_and_resolve(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mimicshield.evaluation import lpips_weights_from, resolve_lpips_weights
    from mimicshield.metrics import LPIPS_WEIGHTS_ENV

    reference = load_file(str(LPIPS_FILE))
    alexnet = {k: v for k, v in reference.items() if k.startswith("features.")}
    alexnet["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file has a classifier
    heads = {k: v for k, v in reference.items() if k.startswith("lin")}
    converted = lpips_weights_from(alexnet, heads)
    assert converted.keys() == reference.keys()
    LPIPS().load_state_dict(converted, strict=True)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_lpips_weights(LPIPS_FILE) == LPIPS_FILE
    with pytest.raises(FileNotFoundError, match="--lpips-weights"):
        resolve_lpips_weights()
    cached = tmp_path / "mimicshield" / "lpips_alexnet.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(LPIPS_FILE.read_bytes())
    assert resolve_lpips_weights() == cached
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(LPIPS_FILE))
    assert resolve_lpips_weights() == LPIPS_FILE


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "bos_token_id": 97,
            "eos_token_id": 98,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    return folder


def _tiny_inception(path):
    """A TorchScript stand-in with the StyleGAN/clean-fid Inception calling convention."""

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.conv(x / 255).relu().mean(dim=(2, 3))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Features()).save(str(path))
    return path


def test_clip_preprocessing_is_what_transformers_gives_the_model():
    """Resize the shorter side, centre-crop, normalise: against transformers' own (PIL)
    CLIPImageProcessor on a non-square 8-bit image. Only the resampling filter differs (PIL's
    bicubic against torch's antialiased one); a wrong crop, size or mean is off by far more."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 6, 9, generator=generator), size=(48, 72), mode="bilinear"
    )
    image = (smooth[0] * 255).round().byte()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    expected = processor(Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")

    class Recorder:
        def get_image_features(self, pixel_values):
            self.seen = pixel_values
            return pixel_values.flatten(1)

    recorder = Recorder()
    mean, std = processor.image_mean, processor.image_std
    ClipImageEmbedder(recorder, 32, mean, std, torch.device("cpu"))(image[None].float() / 255)
    difference = (recorder.seen - expected["pixel_values"]).abs()
    assert recorder.seen.shape == (1, 3, 32, 32)
    assert difference.max() < 0.05 and difference.mean() < 0.01, difference.max()


def test_clip_and_inception_from_local_files(tmp_path):
    clip = ClipImageEmbedder.from_pretrained(str(_tiny_clip(tmp_path / "clip")))
    images = torch.rand(2, 3, 40, 48)
    embeddings = clip(images)
    assert embeddings.shape == (2, 8)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))

    inception = InceptionFeatures.from_file(_tiny_inception(tmp_path / "inception.pt"))
    assert inception(images).shape == (2, 6)
    with pytest.raises(FileNotFoundError):
        InceptionFeatures.from_file(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="TorchScript"):
        InceptionFeatures.from_file(bad)


# --- end to end --------------------------------------------------------------------------------


@requires_assets
def test_evaluate_cli_writes_report_and_metrics(tiny_model_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        image = torch.nn.functional.interpolate(
            torch.rand(1, 3, 4, 4, generator=generator), size=32, mode="bilinear"
        )[0]
        noisy = (image + (torch.rand(image.shape, generator=generator) - 0.5) * 16 / 255).clamp(
            0, 1
        )
        _save(image, tmp_path / "clean" / f"img{i}.png")
        _save(noisy, tmp_path / "noisy" / f"img{i}.png")
        _save(image, tmp_path / "copy" / f"img{i}.png")  # "protection" that changes nothing
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "noisy"), str(tmp_path / "copy")]
    args += ["-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--lpips-weights", str(LPIPS_FILE), "--resolution", "32", "--thumbnail-size", "32"]
    args += ["-s", "sdedit,ti", "--strengths", "0.02,0.05", "--ti-steps", "1"]
    args += ["--num-samples", "2", "--sample-steps", "1"]
    args += ["--clip", str(_tiny_clip(tmp_path / "clip"))]
    args += ["--fid-weights", str(_tiny_inception(tmp_path / "inception.pt"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    assert (out / "mimicry" / "noisy" / "sdedit-ddim@0.05" / "img1.png").is_file()
    assert (out / "mimicry" / "clean" / "textual-inversion" / "sample_001.png").is_file()
    document = json.loads((out / "metrics.json").read_text())
    records = document["records"]

    def values(source, scenario, metric):
        return [
            r["value"]
            for r in records
            if (r["source"], r["scenario"], r["metric"]) == (source, scenario, metric)
        ]

    # identical "protection": PSNR inf, LPIPS 0 against the clean image and its mimicry
    assert values("copy", "imperceptibility", "psnr") == ["inf"] * 3
    assert values("copy", "imperceptibility", "lpips") == [0.0] * 3
    assert values("copy", "sdedit-ddim", "lpips_vs_clean_mimicry") == [0.0] * 6
    assert all(v != "inf" for v in values("noisy", "imperceptibility", "psnr"))
    assert len(values("noisy", "sdedit-onestep", "fid")) == 2
    assert any("biased upward on few samples" in note for note in document["notes"])  # 3 images
    assert len(values("noisy", "textual-inversion", "clip_vs_clean")) == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == len(records)

    html = (out / "report.html").read_text()
    assert "FD-LPIPS (not FID)" in html and "NOT FID" in html and "∞" in html
    assert html.count("<svg") >= 3 and "perturbation ×10" in html

    from test_report import check_in_chromium

    check_in_chromium(out / "report.html")


@requires_assets
def test_unreadable_images_are_left_out_with_a_warning(tiny_model_dir, tmp_path):
    """A broken clean file or protected copy skips that image, not the evaluation."""
    generator = torch.Generator().manual_seed(1)
    for i in range(3):
        image = torch.rand(3, 32, 32, generator=generator)
        _save(image, tmp_path / "clean" / f"img{i}.png")
        _save(image, tmp_path / "copy" / f"img{i}.png")
    (tmp_path / "clean" / "img0.png").write_bytes(b"")  # a broken original
    (tmp_path / "copy" / "img1.png").write_bytes(b"not a png")  # a broken protected copy
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "copy"), "-o", str(out)]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--lpips-weights", str(LPIPS_FILE), "--resolution", "32", "-s", "sdedit"]
    args += ["--strengths", "0.05", "--thumbnail-size", "32"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output  # everything else is written, as protect does
    assert "img0.png: empty file" in result.output and "img1.png" in result.output
    # the clean img1 goes too, as its copy cannot be compared: 3 files
    assert "3 image(s) left out" in result.output
    document = json.loads((out / "metrics.json").read_text())
    for source in ("clean", "copy"):
        images = {r["image"] for r in document["records"] if r["source"] == source and r["image"]}
        assert images == {"img2"}
    files = [Path(entry.split(" (")[0]) for entry in document["left_out"]]  # less the reason
    left_out = sorted(f"{path.parent.name}/{path.name}" for path in files)
    assert left_out == ["clean/img0.png", "clean/img1.png", "copy/img1.png"]
    assert [source["images"] for source in document["sources"]] == [1, 1]  # as evaluated


@requires_assets
def test_every_row_averages_the_same_images(tiny_model_dir, tmp_path):
    """An image one protected folder lacks is left out of every source: the clean row's mean
    over an image the method row lacks would make up a difference between the rows."""
    generator = torch.Generator().manual_seed(2)
    for i in range(3):
        image = torch.rand(3, 32, 32, generator=generator)
        noisy = (image + (torch.rand(image.shape, generator=generator) - 0.5) * 16 / 255).clamp(
            0, 1
        )
        _save(image, tmp_path / "clean" / f"img{i}.png")
        _save(noisy, tmp_path / "full" / f"img{i}.png")
        if i != 1:
            _save(noisy, tmp_path / "partial" / f"img{i}.png")
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "full")]
    args += [str(tmp_path / "partial"), "-o", str(out)]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    args += ["--lpips-weights", str(LPIPS_FILE), "--resolution", "32", "-s", "sdedit-onestep"]
    args += ["--strengths", "0.1", "--thumbnail-size", "32"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "left out of every source" in result.output and "img1" in result.output
    document = json.loads((out / "metrics.json").read_text())
    for source in ("clean", "full", "partial"):
        images = {r["image"] for r in document["records"] if r["source"] == source and r["image"]}
        assert images == {"img0", "img2"}, source
    summary = {(s["source"], s["scenario"], s["metric"]): s for s in document["summary"]}
    for source in ("clean", "full", "partial"):
        row = summary[(source, "sdedit-onestep", "lpips_vs_clean")]
        values = [
            r["value"]
            for r in document["records"]
            if (r["source"], r["scenario"], r["metric"])
            == (source, "sdedit-onestep", "lpips_vs_clean")
        ]
        assert row["n"] == 2 and row["mean"] == pytest.approx(sum(values) / 2)
    assert [source["images"] for source in document["sources"]] == [2, 2, 2]
    assert not (out / "mimicry" / "clean" / "sdedit-onestep@0.1" / "img1.png").exists()


def test_set_metrics_of_a_paired_scenario_compare_the_images_the_source_has():
    """A protected folder missing one copy is compared, for FID and the like, with the clean
    images it has copies of, not with the whole clean set."""
    from mimicshield.evaluation import _measure
    from mimicshield.mimicry import Variant

    class Suite:
        clip = None

        def compare(self, a, b):
            return {}

        def set_metrics(self, real, fake):
            seen.append((len(real), len(fake)))
            return {}

    seen: list[tuple[int, int]] = []
    clean = {key: torch.zeros(3, 8, 8) for key in ("a", "b", "c")}
    outputs = {"a": torch.zeros(3, 8, 8), "c": torch.ones(3, 8, 8)}
    _measure(None, Suite(), Variant("sdedit-ddim", 0.1), "p", outputs, {}, clean, lambda *a: None)
    _measure(None, Suite(), Variant("lora", None), "p", outputs, {}, clean, lambda *a: None)
    assert seen == [(2, 2), (3, 2)]  # samples of a learned concept: against the whole set


def test_an_earlier_evaluation_is_not_replaced_without_overwrite(tmp_path):
    """Checked before the model loads: the earlier report stays as it was."""
    for folder in ("clean", "protected"):
        (tmp_path / folder).mkdir()
        _save(torch.rand(3, 32, 32), tmp_path / folder / "a.png")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.html").write_text("the earlier report")
    args = ["evaluate", str(tmp_path / "clean"), str(tmp_path / "protected"), "-o", str(out)]
    args += ["--model", str(tmp_path / "no-such-model")]

    def said(result) -> str:  # the one-line error main() prints, as the command raised it
        return f"{result.output} {result.exception}"

    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "--overwrite" in said(result)
    assert "no such model" not in said(result)  # refused before loading
    assert (out / "report.html").read_text() == "the earlier report"
    again = CliRunner().invoke(app, [*args, "--overwrite"], env={"COLUMNS": "200"})
    assert "no such model" in said(again)  # past the check, at the model
