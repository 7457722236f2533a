"""``mimicshield protect INPUTS... -o OUT``: protect image files and folders."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_METHOD, DEFAULT_TILE_SIZE, DEFAULT_WORK_SIZE
from ..defaults import DEFAULT_MODEL as DEFAULT_MODEL_ID
from .options import (
    ClipSkipsOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOpt,
    MethodOpt,
    ModelConfigsOpt,
    ModelsOpt,
    ModelWeightOpt,
    SeedOpt,
)

EXAMPLES = """
Examples:
  mimicshield protect art.png -o protected/
  mimicshield protect portfolio/ -o protected/ --category artwork --eps 8
  mimicshield protect "shots/*.jpg" -o out/ --model ./my-sd15-folder --method sdst-
  mimicshield protect art.png -o out/ --model ./sd15 --model ./sdxl.safetensors \\
      --model-weight 1 --model-weight 2
"""


LOW_MEMORY_HELP = (
    "less GPU memory (encoder checkpointing; SDS methods stream the UNet from CPU memory), slower"
)
BATCH_SIZE_HELP = (
    "images of equal size per batch: N, or auto (CUDA: as many as the card holds, up to 8; "
    "elsewhere 1)"
)
COMPILE_HELP = (
    "torch.compile the networks (GPUs): faster steps after a slow first step per image size; "
    "slower on the CPU (BENCHMARKS.md)"
)
COMPILE_NOTE = "torch.compile: the first step took {seconds:.1f} s, compilation included"
CUDA_GRAPHS_HELP = "CUDA: record a step once and replay it (small batches; experimental)"
NONDETERMINISTIC_HELP = (
    "CUDA: allow PyTorch's non-deterministic kernels and cuDNN's autotuned convolutions (see "
    "BENCHMARKS.md for what they save); the same seed may then give slightly different images"
)


class Category(str, Enum):
    portrait = "portrait"
    anime = "anime"
    artwork = "artwork"
    landscape = "landscape"


class FileFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


class Posterior(str, Enum):
    sample = "sample"
    mean = "mean"


def protect(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    method: MethodOpt = DEFAULT_METHOD,
    eps: Annotated[float, typer.Option(help="L-infinity budget, in 1/255 units (1 to 255)")] = 16,
    steps: Annotated[int, typer.Option(help="number of optimisation steps")] = 100,
    step_size: Annotated[float, typer.Option(help="step size alpha, in 1/255 units")] = 1,
    prompt: Annotated[str | None, typer.Option(help="prompt c (default 'a photo')")] = None,
    category: Annotated[Category | None, typer.Option(help="use the paper's prompt")] = None,
    target: Annotated[
        Path | None, typer.Option(help="target image for photoguard, mist and sdst-")
    ] = None,
    model: ModelsOpt = None,
    model_weight: ModelWeightOpt = None,
    model_config: ModelConfigsOpt = None,
    family: FamilyOpt = None,
    clip_skip: ClipSkipsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    batch_size: Annotated[str, typer.Option(help=BATCH_SIZE_HELP)] = "auto",
    posterior: Annotated[
        Posterior,
        typer.Option(
            help="E(x) of the image being protected: posterior sample or mean (targets: mean)"
        ),
    ] = (Posterior.sample),
    sdst_r: Annotated[float, typer.Option(help="weight r of the SDS term in sdst-")] = 5.0,
    robust: Annotated[
        str | None,
        typer.Option(
            help="harden against purification (EOT): comma-separated jpeg, resize, blur, noise, "
            "none; one is drawn each step (extra cost per step: see README)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="redo outputs that already exist")] = False,
    low_memory: Annotated[bool, typer.Option("--low-memory", help=LOW_MEMORY_HELP)] = False,
    compile_networks: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help=CUDA_GRAPHS_HELP)] = False,
    nondeterministic: Annotated[
        bool, typer.Option("--nondeterministic", help=NONDETERMINISTIC_HELP)
    ] = False,
    work_size: Annotated[
        str | None,
        typer.Option(
            help="'native' (full resolution), or N: compute the perturbation with the shorter "
            "side at N and resize it back onto the original; smaller images keep their size "
            "(default 512, chosen by measurement (README); raised to the model's own size: 768 "
            "for SD 2.x-v, 1024 for SDXL)"
        ),
    ] = None,
    tile_size: Annotated[
        int, typer.Option(help="largest side protected in one piece; larger go in tiles")
    ] = DEFAULT_TILE_SIZE,
    file_format: Annotated[
        FileFormat, typer.Option("--format", help="png (lossless) or jpeg (lossy, weaker)")
    ] = FileFormat.png,
    quality: Annotated[
        int | None, typer.Option(help="JPEG quality 1-100, with --format jpeg (default 95)")
    ] = None,
    metadata: Annotated[
        bool,
        typer.Option(
            "--metadata/--no-metadata",
            help="write the XMP 'no AI/ML training' notice (independent of --strip-metadata)",
        ),
    ] = True,
    strip_metadata: Annotated[
        bool,
        typer.Option(
            "--strip-metadata",
            help="privacy: remove the input's EXIF (GPS included), XMP and text comments from "
            "the outputs; the ICC profile, pixel size and mode are kept",
        ),
    ] = False,
) -> None:
    """Protect images against diffusion mimicry; writes PNGs and OUT/manifest.json.

    Outputs keep the input's pixel size, mode, ICC profile, EXIF (minus orientation), XMP and
    IPTC (--strip-metadata removes the EXIF, XMP, IPTC and text comments).
    Rerun the same command after an interruption to continue where it stopped.
    """
    from rich.console import Console
    from rich.markup import escape

    from ..ensemble import Ensemble
    from ..families import FAMILIES, default_work_size
    from ..images import ImageFileError, load_image
    from ..methods import get_method
    from ..models import load_models
    from ..protector import CATEGORY_PROMPTS, DEFAULT_PROMPT, MAX_SEED, Protector
    from ..resolution import parse_work_size
    from ..robust import parse_robust
    from ..runner import (
        OutputOptions,
        RecordError,
        check_manifest,
        clip_skip_parameter,
        model_id,
        no_inputs_message,
        output_folder_problem,
        protect_files,
        scan_inputs,
    )
    from .errors import CLIError
    from .options import check_clip_skip_option, check_device_options
    from .progress import ProtectProgress, print_results

    try:
        chosen = get_method(method)
    except ValueError as error:
        raise CLIError(f"--method: {error}") from None
    try:
        transforms = parse_robust(robust)  # a typo said now, not after the model has loaded
    except ValueError as error:
        raise CLIError(f"--robust: {error}") from None
    # in the units the user typed, before the model loads (the Protector checks them again)
    if not 1 <= eps <= 255:  # below one grey level the 8-bit file cannot change at all
        raise CLIError(_eps_problem(eps))
    if not 0 < step_size <= 255:
        raise CLIError(f"--step-size must be in (0, 255], in 1/255 units; got {step_size:g}.")
    if steps < 1:
        raise CLIError(f"--steps must be at least 1; got {steps}.")
    if not math.isfinite(sdst_r) or sdst_r < 0:  # a negative weight would undo the SDS term
        raise CLIError(f"--sdst-r must be 0 or more; got {sdst_r:g}.")
    if not 0 <= seed <= MAX_SEED:
        raise CLIError(f"--seed must be between 0 and {MAX_SEED}; got {seed}.")
    if prompt is not None and category is not None:
        raise CLIError("Give --prompt or --category, not both.")
    if target is not None and not chosen.needs_target:
        raise CLIError(f"--target is only used by photoguard, mist and sdst-, not {method}.")
    batch = _batch_size(batch_size, CLIError)
    if cuda_graphs and (compile_networks or low_memory):
        raise CLIError(
            "--cuda-graphs does not combine with --compile (whose reduce-overhead mode records "
            "graphs itself) or --low-memory (which moves weights during the step)."
        )
    if quality is not None and file_format is not FileFormat.jpeg:
        raise CLIError("--quality only applies to --format jpeg.")
    if quality is not None and not 1 <= quality <= 100:
        raise CLIError(f"--quality must be between 1 and 100; got {quality}.")
    if tile_size < 64:
        raise CLIError(f"--tile-size must be at least 64; got {tile_size}.")
    check_device_options(device, dtype)
    sources = model or [DEFAULT_MODEL_ID]
    configs = _per_model(model_config, sources, "--model-config", CLIError)
    families = _per_model(family, sources, "--family", CLIError)
    for name in families:
        if name is not None and name not in FAMILIES:
            raise CLIError(f"--family must be one of auto, {', '.join(FAMILIES)}; got {name!r}.")
    clip_skips = _clip_skips(clip_skip, sources, CLIError)
    for value in clip_skips:
        check_clip_skip_option(value)
    if model_weight is not None and len(model_weight) != len(sources):
        raise CLIError(
            f"--model-weight: give one weight per --model ({len(sources)}); "
            f"got {len(model_weight)}."
        )
    if model_weight is not None and not all(w > 0 for w in model_weight):
        raise CLIError(f"--model-weight: weights must be positive; got {model_weight}.")
    try:
        options = OutputOptions(
            work_size=parse_work_size(work_size or str(DEFAULT_WORK_SIZE or "native")),
            tile_size=tile_size,
            file_format=file_format.value,
            quality=95 if quality is None else quality,
            provenance=metadata,
            strip_metadata=strip_metadata,
        )
    except ValueError as error:
        raise CLIError(f"--work-size: {error}") from error
    scan = scan_inputs(inputs, exclude=out)
    files, missing = scan.files, scan.missing
    if not files:
        raise CLIError(no_inputs_message(inputs, missing))
    # before the model loads (minutes, gigabytes), not after the first image
    if (problem := output_folder_problem(inputs, out)) is not None:
        raise CLIError(problem)
    with held_output(out):  # until the command ends: one run at a time per folder
        try:
            check_manifest(out)
        except RecordError as error:  # not ours, or read-only
            raise CLIError(str(error)) from None

        target_image = None
        if target is not None:
            try:
                target_image = load_image(target).rgb
            except ImageFileError as error:
                raise CLIError(f"--target {error}") from error

        err = Console(stderr=True)
        for note in scan.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        if file_format is FileFormat.jpeg:
            err.print(
                "[yellow]warning:[/yellow] JPEG is lossy: its compression removes part of the "
                "perturbation and weakens the protection; PNG keeps all of it."
            )
        loaded_models = []
        for source, config, family_name, skip in zip(
            sources, configs, families, clip_skips, strict=True
        ):
            with err.status(f"Loading {source} ..."):
                loaded_models.append(
                    load_models(
                        source,
                        device=device,
                        dtype=dtype,
                        single_file_config=config,
                        family=family_name,
                        clip_skip=skip,
                    )
                )
        loaded = loaded_models[0]
        engine = loaded if len(loaded_models) == 1 else Ensemble(loaded_models, model_weight)
        if compile_networks and loaded.device.type == "cpu":
            err.print(
                "[yellow]warning:[/yellow] --compile made steps slower on the CPU where it was "
                "measured (BENCHMARKS.md); it pays on GPUs."
            )
        if cuda_graphs and loaded.device.type != "cuda":
            err.print(
                f"[yellow]warning:[/yellow] --cuda-graphs does nothing on {loaded.device.type}: "
                "CUDA graphs replay steps on NVIDIA GPUs only; steps run as usual."
            )
        if work_size is None:
            sizes = [m.native_size for m in loaded_models]
            options = replace(options, work_size=default_work_size(options.work_size, sizes))
        chosen_prompt = (
            DEFAULT_PROMPT if prompt is None else prompt
        )  # "" is a prompt: unconditional
        if category is not None:
            chosen_prompt = CATEGORY_PROMPTS[category.value]
        protector = Protector(
            engine,
            method,
            target=target_image,
            eps=eps / 255,
            step_size=step_size / 255,
            steps=steps,
            prompt=chosen_prompt,
            posterior=posterior.value,
            r=sdst_r,
            seed=seed,
            robust=transforms,
            cuda_graphs=cuda_graphs,
            deterministic=not nondeterministic,
        )
        from ..performance import AutoBatchSize, apply_performance_options

        fitting = None
        if batch is None:
            fitting = AutoBatchSize(loaded_models, method=method, low_memory=low_memory)
        for each in loaded_models:
            apply_performance_options(
                each,
                [chosen_prompt],
                low_memory,
                compile_networks,
                console=err if each is loaded else None,  # say it once
                method=method,
            )

        single = len(sources) == 1
        header = {
            # local models by their full path: `tiny` and `./tiny/` are one model, and resume
            "model": model_id(sources[0]) if single else [model_id(s) for s in sources],
            "family": loaded.family if single else [m.family for m in loaded_models],
            **({} if single else {"model_weights": engine.weights}),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "parameters": {
                **protector.config.to_dict(),
                "target": str(target) if target else None,
                "clip_skip": clip_skip_parameter(loaded_models),
            },
            "seed": seed,
            "deterministic": protector.deterministic,
        }
        started = time.perf_counter()
        try:
            note = COMPILE_NOTE if compile_networks else None
            with ProtectProgress(len(files), steps, console=err, first_step_note=note) as progress:
                report = protect_files(
                    files,
                    out,
                    protector,
                    options=options,
                    batch_size=batch if fitting is None else partial(fitting, tile_size=tile_size),
                    overwrite=overwrite,
                    manifest_header=header,
                    on_image_start=progress.image_started,
                    on_step=progress.step,
                    on_saving=progress.saving,
                    on_image_done=progress.image_done,
                )
        except KeyboardInterrupt:
            err.print(
                f"Interrupted. Finished images are saved and listed in {out / 'manifest.json'}; "
                "run the same command again to continue."
            )
            raise typer.Exit(code=130) from None
        report.results.extend(missing)
        print_results(report, time.perf_counter() - started)
        for note in report.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        if report.failures:
            raise typer.Exit(code=1)


@contextmanager
def held_output(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the rest of a command: a second run into the folder stops at
    once, with one line, before any model loads (see :func:`~mimicshield.runner.output_lock`)."""
    from ..runner import OutputBusyError, output_lock
    from .errors import CLIError

    try:
        with output_lock(out):
            yield
    except OutputBusyError as error:
        raise CLIError(str(error)) from None


def _eps_problem(eps: float) -> str:
    """One message for every refused ``--eps``, naming the range accepted; a value below 1 is
    most likely on the [0, 1] scale (``0.03`` meaning 8), which it says."""
    message = f"--eps must be between 1 and 255, in 1/255 units; got {eps:g}"
    if not 0 < eps < 1:
        return message + "."
    hint = f" (did you mean {round(eps * 255)}?)" if eps * 255 >= 1 else ""
    return f"{message}, which looks like the [0, 1] scale{hint}."


def _batch_size(value: str, error) -> int | None:
    """``--batch-size``: a positive number, or None for ``auto``."""
    if value.strip().lower() == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise error(f"--batch-size must be a number or 'auto'; got {value!r}.") from None
    if number < 1:
        raise error(f"--batch-size must be at least 1; got {number}.")
    return number


def _per_model(values: list[str] | None, sources: list[str], option: str, error) -> list:
    """One value per --model: none given, one for a single model, or one each in order.

    ``auto`` stands for "not given" at its position (detect the family, use default configs).
    """
    if not values:
        return [None] * len(sources)
    if len(values) != len(sources):
        raise error(
            f"{option}: give one value per --model ({len(sources)}, 'auto' for the default); "
            f"got {len(values)}."
        )
    return [None if value.strip().lower() == "auto" else value for value in values]


def _clip_skips(values: list[int] | None, sources: list[str], error) -> list[int]:
    """``--clip-skip``: 1 for every model when not given, else one value per --model."""
    if not values:
        return [1] * len(sources)
    if len(values) != len(sources):
        raise error(
            f"--clip-skip: give one value per --model ({len(sources)}, 1 for the default); "
            f"got {len(values)}."
        )
    return list(values)


protect.__doc__ = (protect.__doc__ or "") + "\n" + EXAMPLES
