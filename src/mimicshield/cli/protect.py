"""``mimicshield protect INPUTS... -o OUT``: protect image files and folders."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..methods import DEFAULT_METHOD
from ..models import DEFAULT_MODEL as DEFAULT_MODEL_ID
from .options import DeviceOpt, DtypeOpt, MethodOpt, ModelConfigOpt, ModelOpt, SeedOpt

EXAMPLES = """
Examples:
  mimicshield protect art.png -o protected/
  mimicshield protect portfolio/ -o protected/ --category artwork --eps 8
  mimicshield protect "shots/*.jpg" -o out/ --model ./my-sd15-folder --method sdst-
"""


class Category(str, Enum):
    portrait = "portrait"
    anime = "anime"
    artwork = "artwork"
    landscape = "landscape"


class Posterior(str, Enum):
    sample = "sample"
    mean = "mean"


def protect(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    method: MethodOpt = DEFAULT_METHOD,
    eps: Annotated[float, typer.Option(help="L-infinity budget, in 1/255 units")] = 16,
    steps: Annotated[int, typer.Option(help="number of optimisation steps")] = 100,
    step_size: Annotated[float, typer.Option(help="step size alpha, in 1/255 units")] = 1,
    prompt: Annotated[str | None, typer.Option(help="prompt c (default 'a photo')")] = None,
    category: Annotated[Category | None, typer.Option(help="use the paper's prompt")] = None,
    target: Annotated[
        Path | None, typer.Option(help="target image for photoguard, mist and sdst-")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL_ID,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option(help="images of equal size per batch")] = 1,
    posterior: Annotated[Posterior, typer.Option(help="E(x): posterior sample or mean")] = (
        Posterior.sample
    ),
    sdst_r: Annotated[float, typer.Option(help="weight r of the SDS term in sdst-")] = 5.0,
    overwrite: Annotated[bool, typer.Option(help="redo outputs that already exist")] = False,
) -> None:
    """Protect images against diffusion mimicry; writes PNGs and OUT/manifest.json."""
    from rich.console import Console

    from ..images import ImageFileError, load_image
    from ..methods import get_method
    from ..models import load_models
    from ..protector import CATEGORY_PROMPTS, DEFAULT_PROMPT, Protector
    from ..runner import collect_inputs, protect_files
    from .main import CLIError
    from .progress import ProtectProgress, print_results

    chosen = get_method(method)
    if prompt is not None and category is not None:
        raise CLIError("Give --prompt or --category, not both.")
    if target is not None and not chosen.needs_target:
        raise CLIError(f"--target is only used by photoguard, mist and sdst-, not {method}.")
    if batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1; got {batch_size}.")
    files, missing = collect_inputs(inputs)
    if not files:
        raise CLIError(f"No image files found in: {' '.join(inputs)}.")

    target_image = None
    if target is not None:
        try:
            target_image = load_image(target).rgb
        except ImageFileError as error:
            raise CLIError(f"--target {error}") from error

    err = Console(stderr=True)
    with err.status(f"Loading {model} ..."):
        loaded = load_models(
            model, device=device, dtype=dtype, single_file_config=model_config
        )
    chosen_prompt = (
        CATEGORY_PROMPTS[category.value] if category else (prompt or DEFAULT_PROMPT)
    )
    protector = Protector(
        loaded,
        method,
        target=target_image,
        eps=eps / 255,
        step_size=step_size / 255,
        steps=steps,
        prompt=chosen_prompt,
        posterior=posterior.value,
        r=sdst_r,
        seed=seed,
    )
    header = {
        "model": model,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "parameters": {**protector.config.to_dict(), "target": str(target) if target else None},
        "seed": seed,
    }
    started = time.perf_counter()
    with ProtectProgress(len(files), steps, console=err) as progress:
        report = protect_files(
            files,
            out,
            protector,
            batch_size=batch_size,
            overwrite=overwrite,
            manifest_header=header,
            on_image_start=progress.image_started,
            on_step=progress.step,
            on_image_done=progress.image_done,
        )
    report.results.extend(missing)
    print_results(report, time.perf_counter() - started)
    if report.failures:
        raise typer.Exit(code=1)


protect.__doc__ = (protect.__doc__ or "") + "\n" + EXAMPLES
