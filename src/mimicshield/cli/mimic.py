"""``mimicshield mimic INPUTS... -o OUT``: run the mimicry scenarios an attacker would run.

The options that describe the simulations are declared here once and shared with
``mimicshield evaluate``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL as DEFAULT_MODEL_ID
from .options import (
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOneOpt,
    ModelConfigOpt,
    ModelOpt,
    SeedOpt,
    family_or_none,
)

EXAMPLES = """
Examples:
  mimicshield mimic protected/ -o mimicked/ --scenarios sdedit
  mimicshield mimic art.png -o out/ -s img2img --prompt "a painting" --img2img-strengths 0.5
  mimicshield mimic portfolio/ -o out/ --scenarios lora,ti --lora-steps 400 --num-samples 8
"""

ScenariosOpt = Annotated[
    list[str],
    typer.Option(
        "--scenarios",
        "-s",
        help="comma-separated or repeated: sdedit (= sdedit-onestep,sdedit-ddim), sdedit-onestep, "
        "sdedit-ddim, img2img, inpaint, textual-inversion (ti), lora, all",
    ),
]
StrengthsOpt = Annotated[
    str, typer.Option("--strengths", help="SDEdit strengths, comma-separated (paper: 0.01-0.3)")
]
Img2ImgStrengthsOpt = Annotated[
    str, typer.Option("--img2img-strengths", help="img2img strengths, comma-separated")
]
PromptOpt = Annotated[
    str,
    typer.Option(
        help="prompt of the scenarios that take one: SDEdit (unguided, as the paper), img2img "
        "and inpainting; textual inversion and LoRA train on their own"
    ),
]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="classifier-free guidance scale")]
SampleStepsOpt = Annotated[
    int, typer.Option(help="denoising steps of the img2img, inpainting and sampling pipelines")
]
SdeditStepsOpt = Annotated[int, typer.Option(help="length of SDEdit's DDIM schedule")]
ResolutionOpt = Annotated[
    int | None,
    typer.Option(
        help="square size images are resized and cropped to; default: the model's own size "
        "(512 for SD 1.x and 2.x-base, 768 for 2.x-v, 1024 for SDXL); 0 keeps each image's size",
        show_default=False,
    ),
]
MaskOpt = Annotated[
    Path | None,
    typer.Option(
        help="inpainting mask (white = regenerate): one file, or a folder matched by name; "
        "default: keep a centred ellipse"
    ),
]
InpaintKeepOpt = Annotated[
    float, typer.Option(help="automatic mask: the kept ellipse spans this fraction of each side")
]
InpaintModelOpt = Annotated[
    str | None,
    typer.Option(help="an inpainting checkpoint (9-channel UNet); default: --model itself"),
]
InpaintModelConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="for a single-file --inpaint-model: a diffusers folder of the same inpainting "
        "model (its configs describe the 9-channel UNet; works offline)"
    ),
]
NumSamplesOpt = Annotated[int, typer.Option(help="images generated after TI / LoRA training")]
TiStepsOpt = Annotated[int, typer.Option(help="textual-inversion training steps")]
TiLrOpt = Annotated[float, typer.Option("--ti-lr", help="textual-inversion learning rate")]
LoraStepsOpt = Annotated[int, typer.Option(help="DreamBooth-LoRA training steps")]
LoraLrOpt = Annotated[float, typer.Option("--lora-lr", help="DreamBooth-LoRA learning rate")]
LoraRankOpt = Annotated[int, typer.Option(help="LoRA rank")]

SDEDIT_DEFAULT = "0.01,0.05,0.1,0.2,0.3"
IMG2IMG_DEFAULT = "0.3,0.5,0.7"


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"0.1, 0.2"`` -> (0.1, 0.2), strengths in (0, 1]; a CLIError names the option otherwise."""
    from ..mimicry import strength_grid
    from .errors import CLIError

    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise CLIError(f"{option}: give numbers separated by commas; got {text!r}.") from None
    try:
        return strength_grid(values)
    except ValueError as error:
        raise CLIError(f"{option}: {error}") from error


def make_settings(**options) -> object:
    """Build :class:`~mimicshield.mimicry.MimicrySettings` from the shared CLI options."""
    from ..mimicry import MimicrySettings, parse_scenarios
    from ..protector import MAX_SEED
    from .errors import CLIError

    try:
        scenarios = parse_scenarios(options.pop("scenarios"))
    except ValueError as error:
        raise CLIError(f"--scenarios: {error}") from error
    options["sdedit_strengths"] = parse_floats(options.pop("strengths"), "--strengths")
    options["img2img_strengths"] = parse_floats(
        options.pop("img2img_strengths"), "--img2img-strengths"
    )
    if options["resolution"] is not None and options["resolution"] < 0:
        raise CLIError("--resolution must be 0 (native size) or a positive size.")
    if options["resolution"] and options["resolution"] % 8:
        raise CLIError(
            f"--resolution must be a multiple of 8, the VAE's downsampling (the pipelines would "
            f"crop {options['resolution']} to {options['resolution'] // 8 * 8}); got "
            f"{options['resolution']}."
        )
    if not 0 <= options["seed"] <= MAX_SEED:
        raise CLIError(f"--seed must be between 0 and {MAX_SEED}; got {options['seed']}.")
    for name in ("sample_steps", "sdedit_steps", "num_samples", "ti_steps", "lora_steps"):
        if options[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1; got {options[name]}.")
    _check_training_and_guidance(options)
    if (
        "img2img" in scenarios
        and int(options["sample_steps"] * min(options["img2img_strengths"])) < 1
    ):
        raise CLIError("--sample-steps x the smallest img2img strength must be at least 1 step.")
    if "lora" in scenarios and importlib.util.find_spec("peft") is None:
        raise CLIError(
            "--scenarios lora needs peft: pip install 'peft>=0.13' (or '.[evaluate]' in a "
            "checkout), or leave lora out."
        )
    if options["mask"] is not None:
        _check_mask_option(options["mask"])
        if "inpaint" not in scenarios:
            _ignored("--mask", "inpaint")
    return MimicrySettings(scenarios=scenarios, **options)


def _ignored(option: str, scenario: str) -> None:
    """Say that an option given for a scenario the run leaves out does nothing (a user who
    passed it expected it to)."""
    warnings.warn(
        f"{option} is for the {scenario} scenario, which --scenarios leaves out: ignored.",
        stacklevel=3,
    )


def _check_training_and_guidance(options: dict) -> None:
    """The numbers the model only reads minutes later (training, sampling): checked now, so a
    typo is one line before the model loads, not a failure or a silent nonsense run after."""
    from .errors import CLIError

    guidance = options["guidance_scale"]
    if not math.isfinite(guidance) or guidance < 0:
        raise CLIError(f"--guidance must be 0 or more (1 = no guidance); got {guidance:g}.")
    if not 0 < options["inpaint_keep"] <= 1:
        raise CLIError(
            "--inpaint-keep is the fraction of each side the kept ellipse spans, in (0, 1]; "
            f"got {options['inpaint_keep']:g}."
        )
    for name, option in (("ti_learning_rate", "--ti-lr"), ("lora_learning_rate", "--lora-lr")):
        if not math.isfinite(options[name]) or options[name] <= 0:
            raise CLIError(f"{option} must be a positive number; got {options[name]:g}.")
    if options["lora_rank"] < 1:
        raise CLIError(f"--lora-rank must be at least 1; got {options['lora_rank']}.")


def _check_mask_option(mask: Path) -> None:
    """``--mask``: a folder, or one image file the package can read (said in one line)."""
    from ..images import ImageFileError, load_image
    from .errors import CLIError

    if not mask.exists():
        raise CLIError(f"--mask {mask}: no such file or folder.")
    if mask.is_file():
        try:
            load_image(mask)
        except ImageFileError as error:
            raise CLIError(f"--mask {error}") from None


def mask_problems(mask: Path | None, images: dict[str, Path]) -> dict[str, str]:
    """For a ``--mask`` folder: why an image has no usable mask there, by image name (its
    path below its folder without suffix; ``images`` maps names to files).

    Matched as the inpainting matches them (:func:`~mimicshield.mimicry.find_mask`) and read
    with the package's loader, before the model loads: a missing or unreadable mask is named
    with its image, not found after minutes of loading and other scenarios.
    """
    from ..images import ImageFileError, load_image
    from ..mimicry import find_mask

    if mask is None or not mask.is_dir():
        return {}
    problems = {}
    for name, path in images.items():
        found = find_mask(mask, name)
        if found is None:
            problems[name] = f"{path}: no mask for it in --mask {mask}"
            continue
        try:
            load_image(found)
        except ImageFileError as error:
            problems[name] = f"{path}: its mask {error}"
    return problems


def load_mimicry(
    settings,
    model: str,
    model_config,
    device: str,
    dtype: str,
    inpaint_model,
    family=None,
    inpaint_model_config=None,
    clip_skip: int = 1,
):
    """Load the model (with its VAE decoder) and, when given, the inpainting model; both read
    prompts at ``clip_skip``, the attacker's inpainting version of the model being prompted
    as the model is."""
    from rich.console import Console

    from ..mimicry import Mimicry
    from ..models import ModelLoadError, load_models
    from .errors import CLIError

    err = Console(stderr=True, log_path=False)
    with err.status(f"Loading {model} ..."):
        loaded = load_models(
            model,
            device=device,
            dtype=dtype,
            with_decoder=True,
            single_file_config=model_config,
            family=family_or_none(family),
            clip_skip=clip_skip,
        )
    inpainter = None
    if inpaint_model is not None and "inpaint" not in settings.scenarios:
        _ignored("--inpaint-model", "inpaint")
    if inpaint_model is not None and "inpaint" in settings.scenarios:
        with err.status(f"Loading {inpaint_model} ..."):
            try:
                inpainter = load_models(
                    inpaint_model,
                    device=device,
                    dtype=dtype,
                    with_decoder=True,
                    single_file_config=inpaint_model_config,
                    inpainting=True,
                    clip_skip=clip_skip,
                )
            except ModelLoadError as error:
                raise CLIError(
                    f"--inpaint-model: {error} (For the inpainting model that option is "
                    "--inpaint-model-config.)"
                ) from None
    elif "inpaint" in settings.scenarios:
        err.print(
            "[yellow]note[/yellow] inpaint runs the main model, which blends the kept region "
            "back at each step; attackers use an inpainting checkpoint (--inpaint-model)."
        )
    return Mimicry(loaded, settings, inpaint_model=inpainter)


class RichProgress:
    """One bar with ETA for the loop that is running; a log line for each finished loop."""

    def __init__(self, console) -> None:
        from .progress import counting_progress

        self.progress = counting_progress(console)
        self.task = None
        self.description = ""
        self.started = 0.0

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        self.progress.stop()

    def _finish(self) -> None:
        if self.task is not None:
            seconds = time.perf_counter() - self.started
            self.progress.console.log(f"{self.description}: {seconds:.1f} s")

    def start(self, description: str, total: int) -> None:
        from rich.markup import escape

        self._finish()
        # a folder's name in the label is text, not rich markup ("[bold]" would vanish)
        description = escape(description)
        self.description, self.started = description, time.perf_counter()
        if self.task is None:
            self.task = self.progress.add_task(description, total=total)
        else:
            self.progress.reset(self.task, total=total, description=description)

    def advance(self, steps: int = 1) -> None:
        self.progress.update(self.task, advance=steps)


def mimic(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
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
            help="replace an earlier run in -o: its outputs this run does not make (those its "
            "mimic.json lists) are removed",
        ),
    ] = False,
) -> None:
    """Simulate mimicry on images; writes OUT/<scenario>/... PNGs and OUT/mimic.json."""
    from rich.console import Console
    from rich.markup import escape

    from ..images import ImageFileError, is_read_only, load_image
    from ..mimicry import size_problem
    from ..runner import (
        OutputClaims,
        existing_outputs_error,
        no_inputs_message,
        output_folder_problem,
        scan_inputs,
    )
    from .errors import CLIError
    from .options import check_clip_skip_option, check_device_options, check_family_option

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
    check_device_options(device, dtype)
    check_family_option(family)
    check_clip_skip_option(clip_skip)
    err = Console(stderr=True, log_path=False)
    scan = scan_inputs(inputs, exclude=out)  # not its own outputs when -o is inside an input
    files, missing = scan.files, scan.missing
    if not files:
        raise CLIError(no_inputs_message(inputs, missing))
    if (problem := output_folder_problem(inputs, out)) is not None:
        raise CLIError(problem)
    for note in scan.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    failed = [m.error for m in missing]  # reported at the end; the readable images go on
    variants = settings.variants()
    claims = OutputClaims(item.path for item in files)
    images = {}
    mimicked: list[str] = []  # the input files behind ``images``
    for item in files:
        name = item.relative.with_suffix("").as_posix()
        destinations = [out / v.key / f"{name}.png" for v in variants if v.paired]
        if (refused := claims.refusal(item.path, *destinations)) is not None:
            failed.append(refused)
            continue
        try:  # read now, so a bad file is named before the model loads; kept as a path,
            loaded = load_image(item.path)  # since a folder of full-size images would not fit
        except ImageFileError as error:
            failed.append(str(error))
            continue
        _, height, width = loaded.rgb.shape
        if (problem := size_problem(width, height, settings.resolution)) is not None:
            failed.append(f"{item.path}: {problem}.")
            continue
        images[name] = item.path
        claims.claim(item.path, *destinations)
        mimicked.append(str(item.path))
    if not images:
        raise CLIError(f"None of the images can be mimicked: {'; '.join(failed)}")
    unmasked = _unmasked(settings, images, failed)
    # a training variant's weights and samples: one set, written together
    trained = []
    for variant in (v for v in variants if not v.paired):
        folder = out / variant.key
        trained.append(folder / f"{variant.scenario}_weights.safetensors")
        trained.extend(folder / f"sample_{i:03d}.png" for i in range(settings.num_samples))
    if not overwrite:
        planned = [out / "mimic.json", *claims.claimed, *trained]
        if (message := existing_outputs_error(planned, out)) is not None:
            raise CLIError(message)
    elif kept := [path for path in (out / "mimic.json", *trained) if is_read_only(path)]:
        # said before the model loads: the run's record, or one file of a set that a new
        # training would leave beside the others of another run
        raise CLIError(
            f"-o {out}: {kept[0]} is read-only; not replaced (make it writable, or choose "
            "another -o)."
        )
    stale = _stale_outputs(out, {*claims.claimed, *trained}) if overwrite else []
    if kept := [path for path in stale if is_read_only(path)]:
        raise CLIError(
            f"-o {out}: {kept[0]}, an earlier run's output this run does not make, is "
            "read-only; not removed (make it writable, or choose another -o)."
        )

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
    settings = mimicry.settings  # the resolution resolved to the model's own size
    _remove_stale(out, stale)  # the model loaded: the earlier run's other variants go
    outputs: list[str] = []
    try:
        _run_variants(mimicry, variants, images, unmasked, out, outputs, failed, err)
    except KeyboardInterrupt:
        err.print(
            f"Interrupted. The {len(outputs)} file(s) written to {out} are complete (none is "
            "half-written); mimic.json is written by a finished run only: run the same command "
            "with --overwrite to redo it."
        )
        raise typer.Exit(code=130) from None

    from .. import __version__
    from ..images import write_text_atomically

    record = {
        "mimicshield_version": __version__,
        "model": model,
        "inpaint_model": inpaint_model if "inpaint" in settings.scenarios else None,
        "clip_skip": clip_skip,
        "inputs": mimicked,
        "settings": settings.to_dict(),
        "outputs": outputs,
        "failed": failed,
    }
    text = json.dumps(record, indent=2)
    write_text_atomically(out / "mimic.json", text)
    err.print(f"{len(outputs)} file(s) written to {out}")
    if failed:
        err.print(f"{len(failed)} input(s) left out:")
        for message in failed:
            err.print(f"  {escape(message)}", soft_wrap=True)
        raise typer.Exit(code=1)


def earlier_outputs(out: Path) -> list[Path]:
    """The files the earlier run's ``out/mimic.json`` lists, as paths under ``out``: each in
    one of the variant folders that run made, none of a user's other files."""
    from ..mimicry import MimicrySettings

    try:
        record = json.loads((out / "mimic.json").read_text(encoding="utf-8"))
        earlier = record["settings"]
        keys = {
            variant.key
            for variant in MimicrySettings(
                scenarios=list(earlier["scenarios"]),
                sdedit_strengths=tuple(earlier["sdedit_strengths"]),
                img2img_strengths=tuple(earlier["img2img_strengths"]),
            ).variants()
        }
        listed = [Path(path) for path in record["outputs"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []  # none, or not one mimic wrote: nothing is known to be its own
    found = []
    for path in listed:
        relative = _under(out, path, keys)
        if relative is None or ".." in relative.parts or len(relative.parts) < 2:
            continue
        if relative.parts[0] in keys:
            found.append(out / relative)
    return found


def _under(out: Path, path: Path, keys: set[str]) -> Path | None:
    """``path`` (as the earlier run wrote it, from its working folder) relative to ``out``;
    else from its last variant folder on, for an ``-o`` spelt another way or a run from
    another working folder (a relative path then resolves to the wrong place, maybe still
    inside ``out``)."""
    try:
        relative = path.resolve().relative_to(out.resolve())
    except ValueError:
        relative = None
    if relative is not None and relative.parts and relative.parts[0] in keys:
        return relative
    starts = [i for i, part in enumerate(path.parts[:-1]) if part in keys]
    return Path(*path.parts[starts[-1] :]) if starts else None


def _stale_outputs(out: Path, planned: set[Path]) -> list[Path]:
    """The earlier run's outputs that this run would not replace: with ``--overwrite`` they
    go, so no variant or image of that run is left beside a mimic.json that omits it."""
    planned = {path.resolve() for path in planned}
    return [p for p in earlier_outputs(out) if p.resolve() not in planned and p.is_file()]


def _remove_stale(out: Path, stale: list[Path]) -> None:
    """Delete ``stale`` and the earlier record (it lists them), then the folders left empty;
    a folder holding anything else stays."""
    if not stale:
        return
    (out / "mimic.json").unlink(missing_ok=True)  # a new one is written by a finished run
    for path in stale:
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == out or out not in folder.parents or any(folder.iterdir()):
                break
            folder.rmdir()


def _unmasked(settings, images: dict[str, Path], failed: list[str]) -> set[str]:
    """The images the inpaint scenario skips, for want of a usable mask in the --mask folder;
    each is added to ``failed``. Refuses the run when inpaint is all it has to do and no
    image has a mask."""
    from .errors import CLIError

    if "inpaint" not in settings.scenarios:
        return set()
    problems = mask_problems(settings.mask, images)
    if problems and len(problems) == len(images) and settings.scenarios == ["inpaint"]:
        first = next(iter(problems.values()))
        raise CLIError(f"No image has a usable mask ({len(problems)} image(s); first: {first}).")
    failed.extend(f"{problem}; inpaint skipped for it." for problem in problems.values())
    return set(problems)


def _run_variants(
    mimicry, variants, paths: dict, unmasked: set[str], out: Path, outputs, failed, err
):
    """Run every variant on the images and save what it makes; ``outputs`` grows with each
    file saved, so an interrupted run can say what is complete. A file the user made
    read-only is not replaced (nor made, when it is one image's): it goes into ``failed``."""
    import torch
    from safetensors.torch import save_file

    from ..images import ReadOnlyFileError, is_read_only, load_image, save_png, write_atomically
    from ..mimicry import fit_image
    from .errors import CLIError

    def save(path: Path, write) -> None:
        try:
            write()
        except ReadOnlyFileError as error:
            failed.append(str(error))
            return
        outputs.append(str(path))

    settings = mimicry.settings
    images = {
        name: fit_image(load_image(path).rgb, settings.resolution) for name, path in paths.items()
    }
    with RichProgress(err) as progress:
        for variant in variants:
            folder = out / variant.key
            steps = mimicry.steps(variant)
            if variant.paired:
                skipped = unmasked if variant.scenario == "inpaint" else set()
                chosen = {name: image for name, image in images.items() if name not in skipped}
                kept = [name for name in chosen if is_read_only(folder / f"{name}.png")]
                failed.extend(str(ReadOnlyFileError(folder / f"{name}.png")) for name in kept)
                chosen = {name: image for name, image in chosen.items() if name not in kept}
                progress.start(variant.label, len(chosen) * steps)
                for name, image in chosen.items():
                    result = mimicry.run(variant, image, name, lambda s, t: progress.advance())
                    path = folder / f"{name}.png"
                    save(path, lambda path=path, result=result: save_png(result, path))
                continue
            if len({tuple(image.shape) for image in images.values()}) > 1:
                raise CLIError(f"{variant.scenario} needs images of one size: use --resolution N.")
            progress.start(variant.label, steps)
            batch = torch.stack(list(images.values()))
            samples, weights = mimicry.run_set(variant, batch, lambda s, t: progress.advance())
            for i, sample in enumerate(samples):
                path = folder / f"sample_{i:03d}.png"
                save(path, lambda path=path, sample=sample: save_png(sample, path))
            weights_file = folder / f"{variant.scenario}_weights.safetensors"
            tensors = {k: v.contiguous() for k, v in weights.items()}

            def write_weights(path: Path = weights_file, tensors: dict = tensors) -> None:
                write_atomically(path, lambda part: save_file(tensors, str(part)))

            save(weights_file, write_weights)


mimic.__doc__ = (mimic.__doc__ or "") + "\n" + EXAMPLES
