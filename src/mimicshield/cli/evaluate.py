"""``mimicshield evaluate CLEAN_DIR PROTECTED_DIR... -o OUT``: numbers and pictures."""

from __future__ import annotations

import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL as DEFAULT_MODEL_ID
from .mimic import (
    IMG2IMG_DEFAULT,
    SDEDIT_DEFAULT,
    GuidanceOpt,
    Img2ImgStrengthsOpt,
    InpaintKeepOpt,
    InpaintModelConfigOpt,
    InpaintModelOpt,
    LoraLrOpt,
    LoraRankOpt,
    LoraStepsOpt,
    MaskOpt,
    NumSamplesOpt,
    PromptOpt,
    ResolutionOpt,
    SampleStepsOpt,
    ScenariosOpt,
    SdeditStepsOpt,
    StrengthsOpt,
    TiLrOpt,
    TiStepsOpt,
)
from .options import (
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOneOpt,
    ModelConfigOpt,
    ModelOpt,
    SeedOpt,
)
from .purify import PURIFIED_FOLDER

# the image folders evaluate writes into -o: mimicry outputs (evaluation.evaluate) and purified
# copies (purify.write_purified_folders)
OWN_FOLDERS = ("mimicry", PURIFIED_FOLDER)

EXAMPLES = """
Examples:
  mimicshield evaluate photos/ protected/ -o eval/ --lpips-weights lpips_alexnet.safetensors
  mimicshield evaluate photos/ out-sds/ out-mist/ out-photoguard/ -o eval/ --scenarios all \\
      --clip openai/clip-vit-large-patch14 --fid-weights inception-2015-12-05.pt
"""


def evaluate(
    clean_dir: Annotated[Path, typer.Argument(help="folder of the original images")],
    protected_dirs: Annotated[
        list[Path], typer.Argument(help="one folder of protected PNGs per method")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    lpips_weights: Annotated[
        Path | None,
        typer.Option(
            help="lpips_alexnet.safetensors (default: $MIMICSHIELD_LPIPS_WEIGHTS, else "
            "downloaded once to ~/.cache/mimicshield)",
        ),
    ] = None,
    clip: Annotated[
        str | None, typer.Option(help="CLIP model (hub id or folder) for CLIP image similarity")
    ] = None,
    fid_weights: Annotated[
        Path | None,
        typer.Option(help="TorchScript Inception features (inception-2015-12-05.pt) for FID"),
    ] = None,
    scenarios: ScenariosOpt = ["sdedit"],  # noqa: B006 - typer needs a list default
    strengths: StrengthsOpt = SDEDIT_DEFAULT,
    img2img_strengths: Img2ImgStrengthsOpt = IMG2IMG_DEFAULT,
    prompt: PromptOpt = "a photo",
    guidance: GuidanceOpt = 7.5,
    sample_steps: SampleStepsOpt = 50,
    sdedit_steps: SdeditStepsOpt = 100,
    resolution: ResolutionOpt = None,
    mask: MaskOpt = None,
    inpaint_keep: InpaintKeepOpt = 0.6,
    inpaint_model: InpaintModelOpt = None,
    inpaint_model_config: InpaintModelConfigOpt = None,
    num_samples: NumSamplesOpt = 4,
    ti_steps: TiStepsOpt = 300,
    ti_lr: TiLrOpt = 5e-3,
    lora_steps: LoraStepsOpt = 200,
    lora_lr: LoraLrOpt = 1e-4,
    lora_rank: LoraRankOpt = 4,
    report_scenario: Annotated[
        str | None,
        typer.Option(help="scenario shown in the image rows, e.g. sdedit-ddim@0.3 (default)"),
    ] = None,
    thumbnail_size: Annotated[int, typer.Option(help="longest side of report images")] = 256,
    purify: Annotated[
        str | None,
        typer.Option(
            help="also evaluate after these purifications, e.g. jpeg75,blur or all (see "
            "`mimicshield purify`): protection metrics and surviving latent distortion"
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL_ID,
    model_config: ModelConfigOpt = None,
    family: FamilyOneOpt = None,
    clip_skip: ClipSkipOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="replace an earlier evaluation in -o: its report, metrics, mimicry/ and purified/",
        ),
    ] = False,
) -> None:
    """Run mimicry on clean and protected images; writes report.html, metrics.csv/.json."""
    from rich.console import Console
    from rich.markup import escape

    from ..evaluation import ClipImageEmbedder, InceptionFeatures, MetricSuite, write_metrics
    from ..evaluation import evaluate as run_evaluation
    from ..metrics import LPIPS
    from ..models import check_model_source
    from ..report import write_report
    from ..runner import output_folder_problem
    from .errors import CLIError
    from .mimic import RichProgress, load_mimicry, make_settings
    from .options import check_clip_skip_option, check_device_options, check_family_option
    from .purify import add_surviving_distortion, parse_purify_option, write_purified_folders

    settings = make_settings(
        scenarios=scenarios,
        strengths=strengths,
        img2img_strengths=img2img_strengths,
        prompt=prompt,
        guidance_scale=guidance,
        sample_steps=sample_steps,
        sdedit_steps=sdedit_steps,
        resolution=resolution,
        mask=mask,
        inpaint_keep=inpaint_keep,
        num_samples=num_samples,
        ti_steps=ti_steps,
        ti_learning_rate=ti_lr,
        lora_steps=lora_steps,
        lora_learning_rate=lora_lr,
        lora_rank=lora_rank,
        seed=seed,
    )
    headline = None
    if report_scenario is not None:
        matches = [v for v in settings.variants() if v.key == report_scenario and v.paired]
        if not matches:
            keys = ", ".join(v.key for v in settings.variants() if v.paired)
            raise CLIError(f"--report-scenario {report_scenario}: choose one of: {keys}.")
        headline = matches[0]
    check_device_options(device, dtype)
    check_family_option(family)
    check_clip_skip_option(clip_skip)
    _check_folders(clean_dir, protected_dirs)
    if thumbnail_size < 16:
        raise CLIError("--thumbnail-size must be at least 16.")
    # before the model loads, not after the first scenario
    if (problem := output_folder_problem([clean_dir, *protected_dirs], out)) is not None:
        raise CLIError(problem)
    if (problem := own_folder_problem([clean_dir, *protected_dirs], out)) is not None:
        raise CLIError(problem)
    earlier = [out / name for name in ("report.html", "metrics.json", "metrics.csv", *OWN_FOLDERS)]
    if not overwrite and any(path.exists() for path in earlier):
        raise CLIError(
            f"-o {out} holds an earlier evaluation (report.html, metrics, mimicry/); choose "
            "another folder, or pass --overwrite to replace it."
        )
    if overwrite and (kept := read_only_outputs(out)):
        more = f" (and {len(kept) - 1} more)" if len(kept) > 1 else ""
        raise CLIError(
            f"-o {out}: {kept[0]}{more} is read-only; not replaced (an evaluation is replaced "
            "whole: make it writable, or choose another -o)."
        )
    _check_pairing(clean_dir, protected_dirs, out, settings)
    purifications = parse_purify_option(purify)
    check_model_source(model)  # a mistyped path, before the LPIPS weights are downloaded
    lpips_file = _checked_lpips_weights(lpips_weights)
    if clip is not None and (problem := clip_source_problem(clip)) is not None:
        raise CLIError(f"--clip {clip}: {problem}")
    if fid_weights is not None and (problem := fid_weights_problem(fid_weights)) is not None:
        raise CLIError(f"--fid-weights {fid_weights}: {problem}")

    mimicry = load_mimicry(
        settings,
        model,
        model_config,
        device,
        dtype,
        inpaint_model,
        family,
        inpaint_model_config,
        clip_skip=clip_skip,
    )
    if overwrite:  # the model loaded: the earlier outputs go, with variants this run lacks
        remove_own_folders(out)
    purified_dirs = write_purified_folders(
        clean_dir, protected_dirs, purifications, out, mimicry.model
    )
    err = Console(stderr=True, log_path=False)
    with err.status("Loading metric models ..."):
        lpips = LPIPS.from_file(lpips_file, mimicry.model.device)
        clip_model = ClipImageEmbedder.from_pretrained(clip, mimicry.model.device) if clip else None
        inception = (
            InceptionFeatures.from_file(fid_weights, mimicry.model.device) if fid_weights else None
        )
    suite = MetricSuite(lpips, clip=clip_model, inception=inception)

    started = time.perf_counter()
    with RichProgress(err) as progress:
        result = run_evaluation(
            clean_dir,
            [*protected_dirs, *purified_dirs],
            mimicry,
            suite,
            out_dir=out,
            headline=headline,
            thumbnail_size=thumbnail_size,
            progress=progress,
        )
    result.settings["model"] = model
    result.settings["inpaint_model"] = inpaint_model if "inpaint" in settings.scenarios else None
    result.settings["clip_skip"] = clip_skip
    resolution_used = mimicry.settings.resolution
    add_surviving_distortion(
        result, clean_dir, protected_dirs, purifications, mimicry.model, resolution_used, [out]
    )
    csv_path, json_path = write_metrics(result, out)
    report_path = write_report(result, out / "report.html")
    print_summary(result, err)
    for warning in result.warnings:
        err.print(f"[yellow]warning[/yellow] {escape(warning)}", soft_wrap=True)
    err.print(
        f"Done in {time.perf_counter() - started:.1f} s: {report_path}, {csv_path}, {json_path}"
    )
    if result.left_out:  # as protect, purify and mimic: the rest is done, but not everything
        err.print(f"{len(result.left_out)} image(s) left out (see the warnings above).")
        raise typer.Exit(code=1)


def _check_folders(clean_dir: Path, protected_dirs: list[Path]) -> None:
    """Every folder exists; no protected folder is the clean one or given twice (it would be
    compared with itself, or evaluated twice under two names)."""
    from .errors import CLIError

    seen: dict[Path, Path] = {}
    for folder in (clean_dir, *protected_dirs):
        if folder.is_file():
            raise CLIError(f"{folder}: a file; evaluate compares folders of images.")
        if not folder.is_dir():
            raise CLIError(f"{folder}: no such folder.")
    for folder in protected_dirs:
        resolved = folder.resolve()
        if resolved == clean_dir.resolve():
            raise CLIError(f"{folder} is the clean folder itself; give the protected copies.")
        if resolved in seen:
            raise CLIError(f"{folder}: given twice; give each protected folder once.")
        seen[resolved] = folder


def _check_pairing(clean_dir: Path, protected_dirs: list[Path], out: Path, settings) -> None:
    """Pair the folders now, as the evaluation will: a protected folder none of whose images
    match a clean one, or a missing inpainting mask, is said before the model loads."""
    from ..evaluation import pair_folders
    from .errors import CLIError
    from .mimic import mask_problems

    try:
        clean, _ = pair_folders(clean_dir, protected_dirs, exclude=[out])
    except (OSError, ValueError) as error:
        raise CLIError(str(error)) from None
    small = _too_small(clean.files.values(), settings.resolution)
    if len(small) == len(clean.files):
        raise CLIError(f"None of the clean images can be mimicked (first: {small[0]}).")
    if small:  # said now, before minutes of loading; each is named again when left out
        warnings.warn(
            f"{len(small)} clean image(s) will be left out (first: {small[0]}).", stacklevel=2
        )
    if "inpaint" in settings.scenarios:
        problems = list(mask_problems(settings.mask, clean.files).values())
        if problems:
            raise CLIError(
                f"{len(problems)} clean image(s) have no usable inpainting mask (first: "
                f"{problems[0]}); add them, or leave inpaint out of --scenarios."
            )


def _too_small(paths, resolution: int | None) -> list[str]:
    """Why each file too small for ``resolution`` is (read from its header, before the model
    loads); the evaluation leaves such files out, with this warning, and goes on."""
    from ..images import ImageFileError, probe_image
    from ..mimicry import size_problem

    problems = []
    for path in paths:
        try:
            header = probe_image(path)
        except ImageFileError:
            continue  # the evaluation names it when it reads it
        if (problem := size_problem(header.width, header.height, resolution)) is not None:
            problems.append(f"{path}: {problem}")
    return problems


def clip_source_problem(source: str) -> str | None:
    """What is wrong with a ``--clip`` that cannot be a CLIPModel, found before the diffusion
    model loads (the metric models load after it, minutes later); a hub id is checked when it
    loads."""
    from ..models import looks_like_path

    path = Path(source).expanduser()
    takes = "--clip takes a CLIPModel folder or a hub id, e.g. openai/clip-vit-large-patch14"
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"no config.json ({takes})."
    if path.exists():
        return f"a file ({takes})."
    if looks_like_path(source):
        return f"no such folder ({takes})."
    return None


def fid_weights_problem(path: Path) -> str | None:
    """What is wrong with a ``--fid-weights`` file, found before the diffusion model loads.
    TorchScript files are zip archives: anything else fails ``torch.jit.load`` later with
    the file reader's internal messages."""
    if not path.is_file():
        return "no such file."
    if not zipfile.is_zipfile(path):
        return "not a TorchScript file (for example inception-2015-12-05.pt)."
    return None


def _checked_lpips_weights(given: Path | None) -> Path:
    """The LPIPS weights file, found (or downloaded) and checked before the model loads."""
    from ..evaluation import check_lpips_weights, resolve_lpips_weights
    from ..metrics import LPIPS_WEIGHTS_ENV
    from .errors import CLIError

    try:
        path = resolve_lpips_weights(given)  # downloads them once when none are given
    except OSError as error:
        raise CLIError(str(error)) from None
    if given is not None:
        where = "--lpips-weights"
    elif os.environ.get(LPIPS_WEIGHTS_ENV):
        where = f"{LPIPS_WEIGHTS_ENV}:"
    else:
        where = "the cached LPIPS weights (delete the file to download them again):"
    try:
        check_lpips_weights(path)
    except (OSError, ValueError) as error:
        raise CLIError(f"{where} {error}") from None
    return path


def own_folder_problem(inputs: list[Path], out: Path) -> str | None:
    """An input folder at or inside ``-o``'s ``mimicry/`` or ``purified/``: evaluate writes
    there, and ``--overwrite`` deletes them, so it would write into (or delete) an input."""
    for name in OWN_FOLDERS:
        own = (out / name).resolve()
        for folder in inputs:
            resolved = folder.resolve()
            if resolved == own or own in resolved.parents:
                return (
                    f"{folder} is inside {out / name}, which evaluate writes (and --overwrite "
                    "deletes); move it, or choose another -o."
                )
    return None


def read_only_outputs(out: Path) -> list[Path]:
    """The files of an earlier evaluation in ``out`` that the user made read-only.

    ``--overwrite`` replaces the report, the metrics and the image folders together, so one
    kept file refuses the run: a new report beside an old image would contradict it."""
    from ..images import is_read_only

    files = [out / name for name in ("report.html", "metrics.json", "metrics.csv")]
    files += sorted(path for name in OWN_FOLDERS for path in (out / name).rglob("*"))
    return [path for path in files if is_read_only(path)]


def remove_own_folders(out: Path) -> None:
    """Delete the image folders an earlier evaluation wrote into ``out`` (``--overwrite``), so
    that none of its scenarios or purifications is left beside the new ones."""
    import shutil

    for name in OWN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def print_summary(result, console) -> None:
    """Mean imperceptibility and headline-scenario numbers per method, as a rich table."""
    from rich.table import Table

    from ..evaluation import CLEAN, METRICS, summarize
    from ..report import format_value

    index = {(s.source, s.scenario, s.strength, s.metric): s for s in summarize(result.records)}
    columns = [("imperceptibility", None, m) for m in ("psnr", "ssim", "lpips")]
    if result.headline is not None:
        h = result.headline
        columns += [
            (h.scenario, h.strength, m)
            for m in ("lpips_vs_clean", "lpips_vs_clean_mimicry", "fd_lpips_alexnet")
        ]
    table = Table(title="mimicshield evaluate: means per method")
    table.add_column("method")
    for scenario, strength, metric in columns:
        where = "" if strength is None and scenario == "imperceptibility" else f" {scenario}"
        where += "" if strength is None else f"@{strength:g}"
        info = METRICS[metric]
        against = f" {info.group}" if info.group.startswith("vs ") else ""  # two LPIPS columns
        table.add_column(f"{info.label}{against}{where}", justify="right")
    for source in result.source_names:
        cells = []
        for scenario, strength, metric in columns:
            s = index.get((source, scenario, strength, metric))
            cells.append("–" if s is None else format_value(s.mean, metric, s.n_inf, s.n))
        table.add_row("clean (no protection)" if source == CLEAN else source, *cells)
    console.print(table)


evaluate.__doc__ = (evaluate.__doc__ or "") + "\n" + EXAMPLES
