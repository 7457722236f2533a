"""Measuring protection: run mimicry on clean and protected images and compare the results.

Three families of numbers, as in the paper's evaluation:

* imperceptibility: PSNR, SSIM and LPIPS of the protected image against the clean one;
* protection, per image: LPIPS, SSIM and PSNR (and CLIP image similarity when a CLIP model is
  given) of a mimicry output against the clean image and against the clean image's own mimicry
  output (same scenario, same seed);
* protection, per set: FID and precision/recall on Inception features when Inception weights are
  given, and always a Fréchet distance on LPIPS-AlexNet features, which is *not* FID and is
  labelled so everywhere.

Everything ends up as :class:`Record` rows (source, scenario, strength, image, metric, value);
``metrics.csv``/``metrics.json`` and the HTML report are views of those rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .images import (
    IMAGE_SUFFIXES,
    ImageFileError,
    load_image,
    save_png,
    write_atomically,
    write_text_atomically,
)
from .metrics import LPIPS, json_number, linf_255, psnr, ssim
from .mimicry import Mimicry, MimicrySettings, Variant, fit_image, size_problem

__all__ = [
    "CLEAN",
    "FD_LPIPS_NOTE",
    "METRICS",
    "ClipImageEmbedder",
    "EvaluationResult",
    "InceptionFeatures",
    "MetricSuite",
    "Record",
    "evaluate",
    "frechet_distance",
    "lpips_features",
    "pair_folders",
    "precision_recall",
    "summarize",
    "write_metrics",
]

CLEAN = "clean"
FID_RELIABLE_IMAGES = 2048  # Inception's feature size: fewer images, a singular covariance
FD_LPIPS_NOTE = (
    "fd_lpips_alexnet is a Fréchet distance on LPIPS-AlexNet features (the spatial means of the "
    "five unit-normalised conv taps). It is NOT FID and is not comparable to published FID values."
)


@dataclass(frozen=True)
class MetricInfo:
    """How to show a metric, and which direction means better protection (or imperceptibility)."""

    name: str
    label: str
    higher_is_better: bool
    group: str  # "imperceptibility", "vs clean image", "vs clean mimicry", "set"


METRICS = {
    m.name: m
    for m in (
        MetricInfo("psnr", "PSNR (dB)", True, "imperceptibility"),
        MetricInfo("ssim", "SSIM", True, "imperceptibility"),
        MetricInfo("lpips", "LPIPS", False, "imperceptibility"),
        MetricInfo("linf_255", "L∞ (/255)", False, "imperceptibility"),
        MetricInfo("lpips_vs_clean", "LPIPS", True, "vs clean image"),
        MetricInfo("ssim_vs_clean", "SSIM", False, "vs clean image"),
        MetricInfo("psnr_vs_clean", "PSNR (dB)", False, "vs clean image"),
        MetricInfo("clip_vs_clean", "CLIP sim.", False, "vs clean image"),
        MetricInfo("lpips_vs_clean_mimicry", "LPIPS", True, "vs clean mimicry"),
        MetricInfo("ssim_vs_clean_mimicry", "SSIM", False, "vs clean mimicry"),
        MetricInfo("psnr_vs_clean_mimicry", "PSNR (dB)", False, "vs clean mimicry"),
        MetricInfo("clip_vs_clean_mimicry", "CLIP sim.", False, "vs clean mimicry"),
        MetricInfo("fid", "FID", True, "set"),
        MetricInfo("precision", "precision", False, "set"),
        MetricInfo("recall", "recall", False, "set"),
        MetricInfo("fd_lpips_alexnet", "FD-LPIPS (not FID)", True, "set"),
    )
}


@dataclass
class Record:
    """One number: ``image`` is None for set-level metrics, ``strength`` None where unused."""

    source: str
    scenario: str
    strength: float | None
    image: str | None
    metric: str
    value: float


# --- set-level statistics ----------------------------------------------------------------------


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)) between (N, D) feature sets.

    With centred features A, B and S = X^T X / (n - 1), the eigenvalues of S_a S_b are the
    squared singular values of A B^T / sqrt((n_a - 1)(n_b - 1)), so the trace term is that
    matrix's nuclear norm: exact, and cheap when the sets are smaller than the feature size.
    Larger sets use sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))). NaN with fewer than 2 samples.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        return float("nan")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b
    trace_a = centred_a.pow(2).sum() / (n_a - 1)
    trace_b = centred_b.pow(2).sum() / (n_b - 1)
    if max(n_a, n_b) <= a.shape[1]:
        cross = centred_a @ centred_b.T / math.sqrt((n_a - 1) * (n_b - 1))
        trace_sqrt = torch.linalg.svdvals(cross).sum()
    else:
        cov_a = centred_a.T @ centred_a / (n_a - 1)
        cov_b = centred_b.T @ centred_b / (n_b - 1)
        evals, evecs = torch.linalg.eigh(cov_a)
        sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
        middle = sqrt_a @ cov_b @ sqrt_a
        trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + trace_a + trace_b - 2 * trace_sqrt
    return float(value.clamp(min=0))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls.

    Precision: the fraction of fake samples inside the ball of some real sample, whose radius is
    its distance to its k-th nearest real neighbour. Recall: the same with the roles swapped.
    NaN when a set has k samples or fewer.
    """

    def coverage(reference: Tensor, queries: Tensor) -> float:
        if reference.shape[0] <= k:
            return float("nan")
        within = torch.cdist(reference, reference)
        radii = within.kthvalue(k + 1, dim=1).values  # +1: each point is its own 0th neighbour
        inside = torch.cdist(queries, reference) <= radii[None, :]
        return float(inside.any(dim=1).float().mean())

    real, fake = real.double(), fake.double()
    return coverage(real, fake), coverage(fake, real)


def lpips_features(lpips: LPIPS, images: Tensor) -> Tensor:
    """(N, 1152) features: the spatial mean of each unit-normalised AlexNet tap LPIPS compares."""
    x = (images.to(lpips.shift) * 2 - 1 - lpips.shift) / lpips.scale
    with torch.no_grad():
        taps = lpips._taps(x)
    return torch.cat([tap.mean(dim=(2, 3)) for tap in taps], dim=1).float().cpu()


class InceptionFeatures:
    """Inception pool features from a TorchScript file, for FID and precision/recall.

    The file is the one StyleGAN2-ADA and clean-fid use (``inception-2015-12-05.pt``): it takes
    uint8-valued (N, 3, H, W) images, resizes them to 299 itself, and returns (N, 2048) features
    when called with ``return_features=True``. Any TorchScript module with that contract works.
    """

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device) -> None:
        self.module = module
        self.device = device

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--fid-weights: no such file: {path}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format
                warnings.simplefilter("ignore", DeprecationWarning)  # these weights ship in
                module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as error:
            raise ValueError(
                f"{path}: not a TorchScript Inception feature extractor (for example "
                f"inception-2015-12-05.pt): {str(error).splitlines()[0]}"
            ) from error
        return cls(module.eval(), torch.device(device))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = (images.clamp(0, 1) * 255).round().to(self.device)
        try:
            features = self.module(x, return_features=True)
        except (RuntimeError, TypeError):
            features = self.module(x)
        return features.float().flatten(1).cpu()


# --- LPIPS weights for users ------------------------------------------------------------------

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_HEADS_URL = (
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
)


def lpips_weights_from(alexnet: dict[str, Tensor], heads: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's AlexNet state dict + the LPIPS v0.1 heads -> the ``lpips_alexnet`` layout.

    The conv keys (``features.N.*``) and the head keys (``linN.model.1.weight``) already match
    :class:`~mimicshield.metrics.LPIPS`; the classifier is dropped.
    """
    weights = {k: v.float().contiguous() for k, v in alexnet.items() if k.startswith("features.")}
    weights.update({k: v.float().contiguous() for k, v in heads.items() if k.startswith("lin")})
    return weights


def default_lpips_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return root / "mimicshield" / "lpips_alexnet.safetensors"


def resolve_lpips_weights(path: str | Path | None = None) -> Path:
    """The LPIPS weights file: ``path``, else ``$MIMICSHIELD_LPIPS_WEIGHTS``, else the cache.

    An empty cache is filled by downloading torchvision's AlexNet and the official LPIPS heads
    (once, about 240 MB, converted to one 10 MB file), unless ``HF_HUB_OFFLINE`` is set.
    """
    from .metrics import LPIPS_WEIGHTS_ENV

    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(LPIPS_WEIGHTS_ENV):
        return Path(os.environ[LPIPS_WEIGHTS_ENV]).expanduser()
    cached = default_lpips_cache()
    if cached.is_file():
        return cached
    from .models import hub_offline

    if hub_offline():
        raise FileNotFoundError(
            f"No LPIPS weights: pass --lpips-weights PATH or set {LPIPS_WEIGHTS_ENV} "
            "(HF_HUB_OFFLINE is set, so they are not downloaded)."
        )
    return download_lpips_weights(cached)


def check_lpips_weights(path: Path) -> None:
    """Raise ValueError (FileNotFoundError when absent), one line naming ``path``, unless it
    holds every tensor :class:`~mimicshield.metrics.LPIPS` loads, in its shape, and no other.

    Reads only the file's header: ``evaluate`` checks the weights before the mimicry model
    loads, so a wrong file is named in a second, not after minutes of loading.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path}: a folder; give the lpips_alexnet.safetensors file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LPIPS weights file.")
    with torch.device("meta"):  # the shapes only: nothing is allocated or initialised
        expected = {key: tuple(value.shape) for key, value in LPIPS().state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as weights:
            names = weights.keys()
            found = {key: tuple(weights.get_slice(key).get_shape()) for key in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a safetensors file ({detail}).") from error
    absent = sorted(expected.keys() - found.keys())
    misshapen = sorted(key for key in expected.keys() & found.keys() if found[key] != expected[key])
    unexpected = sorted(found.keys() - expected.keys())
    for problem, keys in (
        ("lacks", absent),
        ("has misshapen", misshapen),
        ("has extra", unexpected),
    ):
        if keys:
            raise ValueError(
                f"{path}: not LPIPS-AlexNet weights: it {problem} tensor(s) such as {keys[0]} "
                f"({len(keys)} in all); give lpips_alexnet.safetensors, or leave the option out to "
                "download it."
            )


def download_lpips_weights(destination: Path) -> Path:
    """Download AlexNet (hash-checked) and the LPIPS v0.1 heads; save them as one file."""
    import tempfile

    from safetensors.torch import save_file
    from torch.hub import download_url_to_file

    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as folder:
        alexnet, heads = Path(folder) / "alexnet.pth", Path(folder) / "alex.pth"
        try:
            download_url_to_file(ALEXNET_URL, str(alexnet), hash_prefix="7be5be79")
            download_url_to_file(LPIPS_HEADS_URL, str(heads))
        except (OSError, RuntimeError) as error:
            raise FileNotFoundError(
                f"Could not download the LPIPS weights ({error}); pass --lpips-weights PATH."
            ) from error
        weights = lpips_weights_from(
            torch.load(alexnet, map_location="cpu", weights_only=True),
            torch.load(heads, map_location="cpu", weights_only=True),
        )
        # atomically, with the mode open() gives (safetensors alone writes 0600)
        write_atomically(destination, lambda part: save_file(weights, str(part)))
    return destination


# --- CLIP ----------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEmbedder:
    """Unit-norm CLIP image embeddings with the preprocessing done in torch.

    transformers' image processor needs torchvision for its default backend; resizing the
    shorter side (bicubic), centre-cropping and normalising here keeps CLIP free of it.
    """

    def __init__(self, model, image_size: int, mean, std, device: torch.device) -> None:
        self.model = model
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device = device

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu") -> ClipImageEmbedder:
        from transformers import CLIPModel

        device = torch.device(device)
        try:
            model = CLIPModel.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"--clip {source}: could not load a CLIPModel ({error}).") from error
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        config_file = Path(source) / "preprocessor_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
        size = int(model.config.vision_config.image_size)
        return cls(model.to(device).eval().requires_grad_(False), size, mean, std, device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        # shorter side to image_size, the longer one truncated, as CLIPImageProcessor does
        scale = self.image_size / min(x.shape[2], x.shape[3])
        size = (
            max(self.image_size, int(x.shape[2] * scale)),
            max(self.image_size, int(x.shape[3] * scale)),
        )
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[:, :, top : top + self.image_size, left : left + self.image_size]
        x = (x.clamp(0, 1) - self.mean) / self.std
        out = self.model.get_image_features(pixel_values=x)
        embedding = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(embedding.float(), dim=-1).cpu()


# --- per-image metrics -------------------------------------------------------------------------


class MetricSuite:
    """The metric models, loaded once: LPIPS always, CLIP and Inception when given."""

    def __init__(
        self,
        lpips: LPIPS,
        *,
        clip: ClipImageEmbedder | None = None,
        inception: InceptionFeatures | None = None,
    ) -> None:
        self.lpips = lpips
        self.clip = clip
        self.inception = inception

    @torch.no_grad()
    def compare(self, a: Tensor, b: Tensor) -> dict[str, float]:
        """PSNR, SSIM and LPIPS between two (3, H, W) images in [0, 1] (plus CLIP when loaded)."""
        a4, b4 = a[None].float(), b[None].float()
        device = self.lpips.shift.device
        values = {
            "psnr": float(psnr(a4, b4)[0]),
            "ssim": float(ssim(a4, b4)[0]),
            "lpips": float(self.lpips(a4.to(device), b4.to(device))[0]),
        }
        if self.clip is not None:
            values["clip"] = float((self.clip(a4) * self.clip(b4)).sum())
        return values

    def features(self, extractor, images: Sequence[Tensor]) -> Tensor:
        """(N, D) features, one image at a time: the sets may hold images of several sizes."""
        return torch.cat([extractor(image[None].float()) for image in images])

    def set_metrics(self, real: Sequence[Tensor], fake: Sequence[Tensor]) -> dict[str, float]:
        """Fréchet distances (and precision/recall with Inception) between two image sets."""
        values = {
            "fd_lpips_alexnet": frechet_distance(
                self.features(partial(lpips_features, self.lpips), real),
                self.features(partial(lpips_features, self.lpips), fake),
            )
        }
        if self.inception is not None:
            real_f = self.features(self.inception, real)
            fake_f = self.features(self.inception, fake)
            values["fid"] = frechet_distance(real_f, fake_f)
            values["precision"], values["recall"] = precision_recall(real_f, fake_f)
        return values


# --- files -------------------------------------------------------------------------------------


@dataclass
class Source:
    """One folder of images: the clean originals, or one protection method's outputs."""

    name: str
    folder: Path
    files: dict[str, Path]  # image key (relative path without suffix) -> file
    missing: list[str] = field(default_factory=list)
    # files left out because another has the same key (cat.jpg beside cat.png): (left out, kept)
    ambiguous: list[tuple[Path, Path]] = field(default_factory=list)
    # protected images without a clean image of the same key: not evaluated
    extra: list[str] = field(default_factory=list)
    # a copy evaluate --purify made of another source: its missing images are counted there
    derived: bool = False


def _image_files(
    folder: Path, exclude: Sequence[Path] = ()
) -> tuple[dict[str, Path], list[tuple[Path, Path]]]:
    """The folder's images by key; of two with one key, the first in sorted order is kept,
    the one ``mimicshield protect`` protected (it refuses the second: same output name).

    Subfolders in ``exclude`` (the protected folders and ``-o`` when they lie inside this one)
    and those holding an earlier run's record are not read: ``photos/protected`` is no part
    of the clean set ``photos``, nor are the purified copies ``evaluate -o photos/eval`` writes.
    """
    from .runner import scan_folder

    files: dict[str, Path] = {}
    ambiguous: list[tuple[Path, Path]] = []
    for path in scan_folder(folder, exclude=exclude).images:
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in files:
                ambiguous.append((path, files[key]))
            else:
                files[key] = path
    return files, ambiguous


def _method_label(folder: Path) -> str:
    """The method named in the folder's manifest.json (written by ``protect``), else its name.

    A folder resumed with another method holds images of each: its manifest's ``runs`` name
    them all, and so does the label ("sds- + mist"), rather than the last run's alone.
    """
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or not JSON
        manifest = None
    if isinstance(manifest, dict):
        runs = manifest.get("runs")
        runs = runs if isinstance(runs, list) and runs else [manifest]
        methods = [_run_method(run) for run in runs]
        methods = list(dict.fromkeys(str(m) for m in methods if m))  # unique, in order
        if methods:
            return " + ".join(methods)
    return folder.name or str(folder)


def _run_method(run: object) -> object:
    """``run["parameters"]["method"]``, or None where a hand-edited manifest lacks it."""
    parameters = run.get("parameters") if isinstance(run, dict) else None
    return parameters.get("method") if isinstance(parameters, dict) else None


def pair_folders(
    clean_dir: Path, protected_dirs: Sequence[Path], exclude: Sequence[Path] = ()
) -> tuple[Source, list[Source]]:
    """Match every protected folder to the clean one by relative path without suffix.

    ``photos/a/cat.jpg`` matches ``protected/a/cat.png``, as ``mimicshield protect`` names it.
    No folder's listing includes another compared folder or one in ``exclude`` (the output
    folder) that lies inside it.
    """
    clean_dir = Path(clean_dir)
    if not clean_dir.is_dir():
        raise FileNotFoundError(f"{clean_dir}: no such folder.")
    folders = [clean_dir, *map(Path, protected_dirs)]

    def others(folder: Path) -> list[Path]:
        return [*exclude, *(other for other in folders if other.resolve() != folder.resolve())]

    clean_files, clean_ambiguous = _image_files(clean_dir, others(clean_dir))
    clean = Source(CLEAN, clean_dir, clean_files, ambiguous=clean_ambiguous)
    if not clean.files:
        raise ValueError(f"{clean_dir}: no images found.")
    methods: list[Source] = []
    protected = list(map(Path, protected_dirs))
    for folder in protected:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder.")
    labels = distinct_labels([_method_label(folder) for folder in protected], protected)
    for folder, label in zip(protected, labels, strict=True):
        found, ambiguous = _image_files(folder, others(folder))
        files = {key: found[key] for key in clean.files if key in found}
        missing = [key for key in clean.files if key not in found]
        extra = [key for key in found if key not in clean.files]
        if not files:
            raise ValueError(f"{folder}: none of its images match a file in {clean_dir}.")
        source = Source(label, folder, files, missing, ambiguous, extra, _is_purified(folder))
        methods.append(source)
    return clean, methods


def distinct_labels(labels: list[str], folders: list[Path]) -> list[str]:
    """One label per folder, told apart where several folders share one (two runs of a
    method): each of them gets its folder's name, or its path where names repeat too, so no
    column reads as the plain method while another has a suffix."""

    def repeated(names: list[str]) -> set[str]:
        return {name for name in names if names.count(name) > 1 or name == CLEAN}

    pairs = list(zip(labels, folders, strict=True))
    shared = repeated(labels)
    named = [f"{label} ({folder.name})" if label in shared else label for label, folder in pairs]
    still = repeated(named)
    return [str(f) if name in still else name for name, (_, f) in zip(named, pairs, strict=True)]


def _is_purified(folder: Path) -> bool:
    """Whether ``folder`` is a purified copy ``evaluate --purify`` wrote (its manifest says)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "purification" in manifest


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in label) or "_"


# --- the evaluation ------------------------------------------------------------------------------


class ProgressSink(Protocol):
    """What :func:`evaluate` reports to: one task at a time, advanced step by step."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


@dataclass
class ImageRow:
    """One report row: thumbnails (data URIs) and the headline numbers for one image."""

    source: str
    image: str
    clean: str
    protected: str
    perturbation: str
    mimic_clean: str | None = None
    mimic_protected: str | None = None
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass
class Gallery:
    """Samples of a learned concept (textual inversion, LoRA) for one source."""

    source: str
    variant: str
    samples: list[str]


@dataclass
class EvaluationResult:
    """Everything measured in one run; the files and the report are views of it."""

    model: str
    settings: dict
    sources: list[dict]
    variants: list[Variant]
    records: list[Record] = field(default_factory=list)
    headline: Variant | None = None
    rows: list[ImageRow] = field(default_factory=list)
    galleries: list[Gallery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # files not evaluated: unreadable, ambiguous
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.sources]


def choose_headline(variants: Sequence[Variant]) -> Variant | None:
    """The variant shown in the image rows: SDEdit-DDIM at its largest strength, else the first
    paired one."""
    paired = [v for v in variants if v.paired]
    ddim = [v for v in paired if v.scenario == "sdedit-ddim"]
    if ddim:
        return max(ddim, key=lambda v: v.strength)
    return paired[0] if paired else None


def evaluate(
    clean_dir: Path,
    protected_dirs: Sequence[Path],
    mimicry: Mimicry,
    suite: MetricSuite,
    *,
    out_dir: Path | None = None,
    headline: Variant | None = None,
    thumbnail_size: int = 256,
    progress: ProgressSink | None = None,
) -> EvaluationResult:
    """Run ``mimicry``'s scenarios on the clean and every protected folder, and measure.

    Mimicry outputs are saved under ``out_dir/mimicry/<source>/<variant>/`` when ``out_dir``
    is given. Clean outputs are computed first, so each protected output is compared with the
    clean output of the same image, scenario and seed as soon as it exists.
    """
    from .report import thumbnail

    progress = progress or _NoProgress()
    settings: MimicrySettings = mimicry.settings
    clean, methods = pair_folders(clean_dir, protected_dirs, exclude=[out_dir] if out_dir else [])
    variants = settings.variants()
    headline = headline or choose_headline(variants)
    result = EvaluationResult(
        model=mimicry.model.name,
        settings=settings.to_dict(),
        sources=[{"name": CLEAN, "folder": str(clean.folder), "images": len(clean.files)}]
        + [
            {"name": m.name, "folder": str(m.folder), "images": len(m.files), "missing": m.missing}
            for m in methods
        ],
        variants=variants,
        headline=headline,
        notes=[FD_LPIPS_NOTE],
    )
    _describe_inputs(result, suite, clean, methods)

    def add(source: str, variant: Variant | None, image: str | None, values: dict) -> None:
        scenario = variant.scenario if variant else "imperceptibility"
        strength = variant.strength if variant else None
        for metric, value in values.items():
            result.records.append(Record(source, scenario, strength, image, metric, float(value)))

    # Native-resolution images, loaded once (the clean ones) or per method. A file that cannot
    # be read is left out, with a warning, and the evaluation goes on without it.
    native_clean = _readable(clean, result, settings.resolution)
    for m in methods:
        m.files = {key: path for key, path in m.files.items() if key in native_clean}
    fitted: dict[str, dict[str, Tensor]] = {CLEAN: {}}

    def fit(tensor: Tensor) -> Tensor:
        return fit_image(tensor, settings.resolution)

    fitted[CLEAN] = {key: fit(img) for key, img in native_clean.items()}

    # 1. Imperceptibility, and the fixed columns of the report rows.
    rows: dict[tuple[str, str], ImageRow] = {}
    total = sum(len(m.files) for m in methods)
    progress.start("imperceptibility", total)
    for m in methods:
        fitted[m.name] = {}
        for key in list(m.files):
            protected = _load_or_leave_out(m, key, result, settings.resolution)
            if protected is None:
                progress.advance()
                continue
            reference = native_clean[key]
            if protected.shape != reference.shape:
                result.warnings.append(
                    f"{m.name}/{key}: size {tuple(protected.shape[1:])} differs from the clean "
                    f"image's {tuple(reference.shape[1:])}; imperceptibility not measured."
                )
                protected = F.interpolate(
                    protected[None], size=reference.shape[1:], mode="bicubic", antialias=True
                )[0].clamp(0, 1)
            else:
                values = suite.compare(protected, reference)
                values.pop("clip", None)
                values["linf_255"] = float(linf_255(protected[None], reference[None])[0])
                add(m.name, None, key, values)
            fitted[m.name][key] = fit(protected)
            perturbation = ((protected - reference) * 10 + 0.5).clamp(0, 1)
            rows[(m.name, key)] = ImageRow(
                source=m.name,
                image=key,
                clean=thumbnail(reference, thumbnail_size),
                protected=thumbnail(protected, thumbnail_size),
                perturbation=thumbnail(perturbation, thumbnail_size),
                numbers=_numbers(result, m.name, key, Variant("imperceptibility")),
            )
            progress.advance()
        _require_images(m)
    rows = _only_shared_images(clean, methods, result, rows, fitted)
    # what was evaluated: without the files left out as unreadable or not shared
    for entry, source in zip(result.sources, (clean, *methods), strict=True):
        entry["images"] = len(source.files)

    def save(source: str, variant: Variant, name: str, image: Tensor) -> None:
        if out_dir is not None:
            path = Path(out_dir) / "mimicry" / _folder_name(source) / variant.key / f"{name}.png"
            save_png(image, path)

    sources = [(CLEAN, list(clean.files))] + [(m.name, list(m.files)) for m in methods]

    # 2. Mimicry, one variant at a time, clean first.
    for variant in variants:
        reference_outputs: dict[str, Tensor] = {}
        for source, keys in sources:
            images = {key: fitted[source][key] for key in keys}
            outputs = _mimic(
                mimicry, variant, source, images, progress, partial(save, source, variant)
            )
            if not variant.paired:
                thumbnails = [thumbnail(sample, thumbnail_size) for sample in outputs.values()]
                result.galleries.append(Gallery(source, variant.key, thumbnails))
            if source == CLEAN:
                reference_outputs = outputs
            _measure(result, suite, variant, source, outputs, reference_outputs, fitted[CLEAN], add)
            if variant == headline and source != CLEAN:
                for key, output in outputs.items():
                    row = rows[(source, key)]
                    row.mimic_clean = thumbnail(reference_outputs[key], thumbnail_size)
                    row.mimic_protected = thumbnail(output, thumbnail_size)
                    row.numbers.update(_numbers(result, source, key, variant))
    result.rows = list(rows.values())
    return result


def _only_shared_images(
    clean: Source,
    methods: Sequence[Source],
    result: EvaluationResult,
    rows: dict[tuple[str, str], ImageRow],
    fitted: dict[str, dict[str, Tensor]],
) -> dict[tuple[str, str], ImageRow]:
    """Keep only the images every source has (after unreadable files were left out), and
    return the report rows that remain.

    Each row of the summary is a mean over images: if the clean row averaged an image a
    method lacks, a difference between the rows would partly be that image's, and could even
    flip sign. So an image missing from or unreadable in any protected folder is left out of
    every source, with a warning, and all rows average the same images.
    """
    shared = [key for key in clean.files if all(key in m.files for m in methods)]
    if not shared:
        raise ValueError(
            "no clean image has a readable copy in every protected folder, so no image can "
            "be compared across them; evaluate the folders in separate runs."
        )
    dropped = [key for key in clean.files if key not in shared]
    if not dropped:
        return rows
    result.warnings.append(
        f"{len(dropped)} clean image(s) lack a readable copy in some protected folder and are "
        f"left out of every source, so that all rows average the same images: {_some(dropped)}"
    )
    keep = set(shared)
    for source in (clean, *methods):
        for key in [key for key in source.files if key not in keep]:
            path = source.files.pop(key)
            if not source.derived:  # a purified copy is evaluate's own file, not the user's
                result.left_out.append(f"{path} (not in every protected folder)")
    for images in fitted.values():
        for key in [key for key in images if key not in keep]:
            del images[key]
    result.records = [r for r in result.records if r.image is None or r.image in keep]
    return {where: row for where, row in rows.items() if where[1] in keep}


def _describe_inputs(result: EvaluationResult, suite: MetricSuite, clean, methods) -> None:
    """The notes on what is not measured, and warnings about the inputs, before any work."""
    if suite.inception is None:
        result.notes.append("FID and precision/recall were not computed: no --fid-weights given.")
    elif len(clean.files) < FID_RELIABLE_IMAGES:
        result.notes.append(
            f"FID here compares {len(clean.files)} images per set; FID is biased upward on few "
            f"samples (papers use thousands, and below {FID_RELIABLE_IMAGES} its covariance is "
            "rank-deficient): compare it only between sources of this run, never with "
            "published values."
        )
    if suite.clip is None:
        result.notes.append("CLIP similarity was not computed: no --clip model given.")
    for source in (clean, *methods):
        for left_out, kept in source.ambiguous:
            result.warnings.append(
                f"{left_out}: left out, {kept.name} has the same name without its suffix "
                "(rename one to evaluate both)."
            )
            result.left_out.append(str(left_out))
    for m in methods:
        if m.missing:
            result.warnings.append(
                f"{m.name}: {len(m.missing)} clean image(s) have no protected copy and are "
                f"skipped for it: {_some(m.missing)}"
            )
            if not m.derived:  # a purified copy lacks what its source lacks: counted there
                result.left_out.extend(f"{m.folder}/{key} (no protected copy)" for key in m.missing)
        if m.extra:
            result.warnings.append(
                f"{m.name}: {len(m.extra)} protected image(s) have no clean image of the same "
                f"name in {clean.folder} and are not evaluated: {_some(m.extra)}"
            )


def _some(keys: Sequence[str], shown: int = 5) -> str:
    """The first few image keys of a list, for a warning."""
    return ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")


def _mimic(
    mimicry: Mimicry,
    variant: Variant,
    source: str,
    images: dict[str, Tensor],
    progress: ProgressSink,
    on_output: Callable[[str, Tensor], None],
) -> dict[str, Tensor]:
    """One source's mimicry outputs: per image for a paired scenario (keyed by image), else the
    samples of the concept learned from all of them (``sample_000``, ...). Each output goes to
    ``on_output`` as soon as it exists, so a later failure loses none."""
    steps = mimicry.steps(variant)

    def advance(_step: int, _total: int) -> None:
        progress.advance()

    outputs: dict[str, Tensor] = {}
    if variant.paired:
        progress.start(f"{variant.label} · {source}", len(images) * steps)
        for key, image in images.items():
            outputs[key] = mimicry.run(variant, image, key, callback=advance)
            on_output(key, outputs[key])
        return outputs
    if len({tuple(image.shape) for image in images.values()}) > 1:
        raise ValueError(
            f"{variant.scenario} trains on images of one size; give --resolution N "
            "(not 0) when the images differ in size."
        )
    progress.start(f"{variant.label} · {source}", steps)
    samples, _ = mimicry.run_set(variant, torch.stack(list(images.values())), callback=advance)
    for i, sample in enumerate(samples):
        outputs[f"sample_{i:03d}"] = sample
        on_output(f"sample_{i:03d}", sample)
    return outputs


def _numbers(result: EvaluationResult, source: str, image: str, variant: Variant) -> dict:
    """The metrics recorded for one image of one source under one variant."""
    wanted = (source, image, variant.scenario, variant.strength)
    return {
        r.metric: r.value
        for r in result.records
        if (r.source, r.image, r.scenario, r.strength) == wanted
    }


def _load_or_leave_out(
    source: Source, key: str, result: EvaluationResult, resolution: int | None
) -> Tensor | None:
    """Image ``key`` of ``source`` as RGB; if it cannot be read, or is too small to mimic at
    ``resolution``, a warning, and the image leaves ``source.files`` (so no later stage looks
    for it)."""
    path = source.files[key]
    try:
        image = load_image(path).rgb
    except ImageFileError as error:
        result.warnings.append(f"{error} It is left out of the evaluation.")
        result.left_out.append(str(source.files.pop(key)))
        return None
    if (problem := size_problem(image.shape[2], image.shape[1], resolution)) is not None:
        result.warnings.append(f"{path}: {problem}. It is left out of the evaluation.")
        result.left_out.append(str(source.files.pop(key)))
        return None
    return image


def _require_images(source: Source) -> None:
    if not source.files:
        raise ValueError(f"{source.folder}: none of its images can be read.")


def _readable(
    source: Source, result: EvaluationResult, resolution: int | None
) -> dict[str, Tensor]:
    """The RGB images of ``source`` that load, all at once (the clean ones are compared with
    every method). Raises when none is left."""
    images = {
        key: _load_or_leave_out(source, key, result, resolution) for key in list(source.files)
    }
    _require_images(source)
    return {key: image for key, image in images.items() if image is not None}


def _measure(result, suite, variant, source, outputs, reference_outputs, clean_images, add):
    """Per-output metrics against the clean image and the clean mimicry; then set metrics."""
    clean_clip = None
    if suite.clip is not None and not variant.paired:
        clean_clip = suite.features(suite.clip, list(clean_images.values()))
    for key, output in outputs.items():
        values: dict[str, float] = {}
        if variant.paired:
            for name, value in suite.compare(output, clean_images[key]).items():
                values[f"{name}_vs_clean"] = value
        elif clean_clip is not None:  # a sample has no paired clean image: the set's mean
            values["clip_vs_clean"] = float((suite.clip(output[None]) @ clean_clip.T).mean())
        if key in reference_outputs:
            for name, value in suite.compare(output, reference_outputs[key]).items():
                values[f"{name}_vs_clean_mimicry"] = value
        add(source, variant, key, values)
    reference = list(clean_images.values())
    if variant.paired:  # the clean images this source has: a missing copy does not count
        reference = [clean_images[key] for key in outputs if key in clean_images]
    set_values = suite.set_metrics(reference, list(outputs.values()))
    add(source, variant, None, set_values)


# --- summaries and files -----------------------------------------------------------------------


@dataclass
class Summary:
    """The mean over finite values; ``n_inf`` counts the +-inf ones (identical images: PSNR)."""

    source: str
    scenario: str
    strength: float | None
    metric: str
    mean: float
    n: int
    n_inf: int
    n_neg_inf: int = 0  # of the n_inf, how many are -inf
    std: float | None = None  # sample standard deviation (n - 1) of two or more finite values

    @property
    def all_inf(self) -> bool:
        return self.n_inf == self.n and self.n > 0

    def rank_key(self) -> tuple[float, float]:
        """What "best" compares: first the net share of +inf values (a mean over all values
        would be infinite), then the mean of the finite ones."""
        net = (self.n_inf - 2 * self.n_neg_inf) / self.n if self.n else 0.0
        return net, self.mean if math.isfinite(self.mean) else 0.0


def summarize(records: Sequence[Record]) -> list[Summary]:
    """Group by (source, scenario, strength, metric), in first-seen order.

    A mean over +inf PSNR values would be +inf and hide every other image, so the mean is over
    the finite values and the infinite ones are counted; an all-infinite group has mean +-inf.
    """
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r.source, r.scenario, r.strength, r.metric), []).append(r.value)
    out = []
    for (source, scenario, strength, metric), values in groups.items():
        finite = [v for v in values if math.isfinite(v)]
        infinite = [v for v in values if math.isinf(v)]
        if finite:
            mean = sum(finite) / len(finite)
        elif infinite:
            mean = infinite[0]
        else:
            mean = float("nan")
        negative = sum(1 for v in infinite if v < 0)
        std = statistics.stdev(finite) if len(finite) > 1 else None
        out.append(
            Summary(
                source, scenario, strength, metric, mean, len(values), len(infinite), negative, std
            )
        )
    return out


def write_metrics(result: EvaluationResult, out_dir: Path) -> tuple[Path, Path]:
    """OUT/metrics.csv (one row per number, long format) and OUT/metrics.json (all, + means)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "metrics.csv"
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["source", "scenario", "strength", "image", "metric", "value"])
    for r in result.records:
        strength = "" if r.strength is None else f"{r.strength:g}"
        writer.writerow(
            [r.source, r.scenario, strength, r.image or "", r.metric, json_number(r.value)]
        )
    write_text_atomically(csv_path, rows.getvalue())

    from . import __version__

    document = {
        "mimicshield_version": __version__,
        "created": result.created,
        "model": result.model,
        "settings": result.settings,
        "sources": result.sources,
        "scenarios": [asdict(v) | {"key": v.key} for v in result.variants],
        "notes": result.notes,
        "warnings": result.warnings,
        "left_out": result.left_out,
        "metrics": {name: asdict(info) for name, info in METRICS.items()},
        "summary": [
            {**asdict(s), "mean": json_number(s.mean), "std": json_number(s.std)}
            for s in summarize(result.records)
        ],
        "records": [{**asdict(r), "value": json_number(r.value)} for r in result.records],
    }
    json_path = out_dir / "metrics.json"
    write_text_atomically(
        json_path, json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    )
    return csv_path, json_path
