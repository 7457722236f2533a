"""``mimicshield purify INPUTS... -o OUT``: apply what an attacker does before mimicry.

Writes ``OUT/<purification>/<relative path>.png`` for every input and purification, at the
input's size, so protected images can be checked (``mimicshield evaluate``) after purification,
and ``OUT/purify.json``, the record of what was written, by which settings, from which input
(later scans of a folder above skip ``OUT``, as they skip protect's and mimic's outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOneOpt,
    ModelConfigOpt,
    family_or_none,
)

# the names of mimicshield.purify.PURIFICATIONS, written out so that --help imports no torch
# (tests/test_purify.py checks that the two agree)
PURIFICATION_NAMES = (
    "jpeg95, jpeg85, jpeg75, jpeg65, down0.5, down0.75, resize, crop20, blur, noise, cleaner, "
    "vae, sdedit"
)

EXAMPLES = """
Examples:
  mimicshield purify protected/ -o purified/ --methods jpeg75,down0.5,blur
  mimicshield purify protected/ -o purified/ --methods all --model ./stable-diffusion-v1-5
"""


def _load_purification_model(
    source: str,
    device: str,
    dtype: str,
    config: str | None,
    family: str | None = None,
    clip_skip: int = 1,
):
    """An SD model with its decoder, or TAEF2 when ``source`` is a folder of taef2_*.pth files."""
    from ..taesd import ENCODER_FILE, TinyAutoencoderLatents

    if (Path(source).expanduser() / ENCODER_FILE).is_file():
        from .errors import CLIError

        try:
            return TinyAutoencoderLatents.from_dir(Path(source).expanduser())
        except (OSError, ValueError) as error:  # a missing, corrupt or foreign weights file
            raise CLIError(f"--model {source}: {error}") from None
    from ..models import load_models

    return load_models(
        source,
        device=device,
        dtype=dtype,
        with_decoder=True,
        single_file_config=config,
        family=family_or_none(family),
        clip_skip=clip_skip,
    )


def purify(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            "-m",
            help=f"comma-separated purifications, or 'all': {PURIFICATION_NAMES} (vae and "
            "sdedit need --model; resize goes to its size, 512 px without one); writes "
            "OUT/<purification>/<input path>.png",
        ),
    ] = "all",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="for vae/sdedit: hub id, diffusers folder, checkpoint, or a TAEF2 weights folder",
        ),
    ] = None,
    model_config: ModelConfigOpt = None,
    family: FamilyOneOpt = None,
    clip_skip: ClipSkipOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace outputs that exist already")
    ] = False,
) -> None:
    """Purify images (JPEG, resizing, cropping, blur, noise, filtering, VAE, SDEdit).

    Every purification keeps the image size and is deterministic (noise uses a fixed seed).
    Outputs are 8-bit RGB PNGs whatever the input's mode (16-bit, grey, alpha): what an
    attacker feeds a diffusion model.
    """
    import torch
    from rich.console import Console
    from rich.markup import escape

    from ..images import ImageFileError, is_read_only, load_image, save_png
    from ..purify import NotApplicableError, parse_purifications
    from ..runner import (
        PURIFY_RECORD_NAME,
        OutputClaims,
        PurifyRecord,
        RecordError,
        check_record,
        existing_outputs_error,
        no_inputs_message,
        output_folder_problem,
        scan_inputs,
        write_problem,
    )
    from .errors import CLIError
    from .options import check_clip_skip_option, check_device_options, check_family_option
    from .progress import counting_progress
    from .protect import held_output

    try:
        chosen = parse_purifications(methods)
    except ValueError as error:
        raise CLIError(f"--methods: {error}") from error
    check_clip_skip_option(clip_skip)
    if model is not None:
        check_device_options(device, dtype)
        check_family_option(family)
    err = Console(stderr=True)
    needs_model = [p.name for p in chosen if p.needs is not None]
    loaded = None
    if needs_model and model is None:
        if methods.strip() != "all":
            verb = "needs" if len(needs_model) == 1 else "need"
            raise CLIError(f"{', '.join(needs_model)} {verb} --model (the model to purify with).")
        err.print(f"[yellow]note:[/yellow] skipping {', '.join(needs_model)} (no --model given).")
        chosen = [p for p in chosen if p.needs is None]

    scan = scan_inputs(inputs, exclude=out)
    files, missing = scan.files, scan.missing
    if not files:
        raise CLIError(no_inputs_message(inputs, missing))
    if (problem := output_folder_problem(inputs, out)) is not None:
        raise CLIError(problem)
    with held_output(out):  # until the command ends: one run at a time per folder
        for note in scan.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        failures = [result.error for result in missing]
        claims = OutputClaims(file.path for file in files)
        planned = []  # (file, {purification name: destination}), checked before anything loads
        for file in files:
            destinations = {
                p.name: out / p.name / file.relative.with_suffix(".png") for p in chosen
            }
            if (refused := claims.refusal(file.path, *destinations.values())) is not None:
                failures.append(refused)
                continue
            claims.claim(file.path, *destinations.values())
            planned.append((file, destinations))
        if not overwrite:
            every = [path for _, destinations in planned for path in destinations.values()]
            if (message := existing_outputs_error(every, out)) is not None:
                raise CLIError(message)
        for (
            file,
            destinations,
        ) in planned:  # a file the user made read-only is kept: said at the end
            for name, destination in list(destinations.items()):
                if is_read_only(destination):
                    failures.append(
                        f"{file.path}: output {destination} is read-only; not replaced."
                    )
                    del destinations[name]
        try:  # not ours, or read-only: said before the model loads
            check_record(out / PURIFY_RECORD_NAME)
        except RecordError as error:
            raise CLIError(str(error)) from None

        if model is not None and (needs_model or any(p.sized for p in chosen)):
            with err.status(f"Loading {model} ..."):
                loaded = _load_purification_model(
                    model, device, dtype, model_config, family, clip_skip
                )
            skipped = [p.name for p in chosen if not p.applicable(loaded)]
            if skipped and methods.strip() != "all":
                raise CLIError(f"{', '.join(skipped)}: not applicable to {model}.")
            if skipped:
                err.print(f"[yellow]note:[/yellow] {', '.join(skipped)} not applicable to {model}.")
            chosen = [p for p in chosen if p.applicable(loaded)]

        record = PurifyRecord(out, [_description(p, loaded, model) for p in chosen])
        written: list[Path] = []  # complete files only: save_png writes atomically
        work = [(file, [p for p in chosen if p.name in d], d) for file, d in planned]
        try:
            with counting_progress(err) as progress:
                bar = progress.add_task("purifying", total=sum(len(todo) for _, todo, _ in work))
                for file, todo, destinations in work:
                    if not todo:
                        continue
                    try:
                        loaded_image = load_image(file.path)
                    except ImageFileError as error:
                        failures.append(str(error))
                        progress.advance(bar, len(todo))
                        continue
                    image = loaded_image.rgb[None]
                    for purification in todo:
                        where = escape(f"{file.relative} ({purification.name})")  # not markup
                        progress.update(bar, description=where)
                        try:
                            with torch.no_grad():
                                result = purification(image, loaded)
                        except NotApplicableError as error:
                            raise CLIError(str(error)) from error
                        destination = destinations[purification.name]
                        record.before_output()
                        try:
                            save_png(result[0], destination, alpha=loaded_image.alpha)
                        except OSError as error:  # e.g. a file where the folder goes
                            why = write_problem(error, destination)
                            failures.append(f"{file.path}: could not write {destination} ({why}).")
                        else:
                            written.append(destination)
                            record.add(file.path, purification.name, destination)
                        progress.advance(bar)
        except KeyboardInterrupt:
            err.print(
                f"Interrupted. The {len(written)} image(s) written to {out} are complete (none is "
                "half-written); run the same command with --overwrite to redo the rest."
            )
            raise typer.Exit(code=130) from None
        for failure in failures:
            err.print(f"[red]failed:[/red] {escape(failure)}", soft_wrap=True)
        images = "image" if len(written) == 1 else "images"
        kinds = "purification" if len(chosen) == 1 else "purifications"
        err.print(f"Wrote {len(written)} {images} to {out} ({len(chosen)} {kinds}).")
        if failures:
            raise typer.Exit(code=1)


purify.__doc__ = (purify.__doc__ or "") + "\n" + EXAMPLES


def _description(purification, loaded, model: str | None) -> dict:
    """What ``purify.json`` says of one purification: its name, what it does, and the values
    it ran with, with the model when it uses one (or would: ``resize`` takes its size)."""
    parameters = purification.parameters(loaded)
    if purification.needs is not None or purification.sized:
        local = model is not None and Path(model).expanduser().exists()
        parameters["model"] = str(Path(model).expanduser().resolve()) if local else model
    if purification.needs == "unet" and hasattr(loaded, "clip_skip"):  # it reads a prompt
        parameters["clip_skip"] = loaded.clip_skip
    return {"name": purification.name, "summary": purification.summary, "parameters": parameters}


# --- glue for ``mimicshield evaluate --purify`` ---------------------------------------------------

PURIFIED_FOLDER = "purified"


def purified_label(label: str, purification: str) -> str:
    """How a purified source is named in the report: ``photoguard+jpeg75``."""
    return f"{label}+{purification}"


def write_purified_folders(
    clean_dir: Path, protected_dirs, purifications, out: Path, model=None
) -> list[Path]:
    """Write p(x) of the clean and every protected folder under ``out/purified/``.

    Each folder gets a manifest.json naming its method ``<label>+<purification>``, so
    ``evaluate`` runs the mimicry on it and reports the protection metrics again after
    purification; the purified clean images are the baseline (what the purification alone does).
    """
    import json

    import torch

    from .. import __version__
    from ..evaluation import CLEAN, pair_folders
    from ..images import load_image, save_png, write_text_atomically

    if not purifications:
        return []
    clean, methods = pair_folders(clean_dir, protected_dirs, exclude=[out])
    folders = []
    for source in (clean, *methods):
        for purification in purifications:
            label = purified_label(source.name, purification.name)
            name = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in label)
            folder = out / PURIFIED_FOLDER / name
            for key, path in source.files.items():
                with torch.no_grad():
                    result = purification(load_image(path).rgb[None], model)
                save_png(result[0], folder / f"{key}.png")
            method = label if source.name != CLEAN else purified_label("clean", purification.name)
            manifest = {
                "mimicshield_version": __version__,  # marks the folder as a run's output
                "parameters": {"method": method},
                "purification": purification.name,
            }
            write_text_atomically(folder / "manifest.json", json.dumps(manifest, indent=2))
            folders.append(folder)
    return folders


def surviving_records(
    clean_dir: Path, protected_dirs, purifications, model, fit, exclude=()
) -> list:
    """Per image and purification, ||E(p(x_adv)) - E(p(x0))|| / ||E(x_adv) - E(x0)||.

    As in the purified folders, ``p`` acts on the file at its own size; ``fit`` then maps each
    (3, H, W) image to what the mimic encodes (the evaluation's resolution).
    """
    import torch

    from ..evaluation import Record, pair_folders
    from ..images import ImageFileError, load_image
    from ..purify import latent_distance, survival_ratio
    from ..report import SURVIVING_METRIC

    clean, methods = pair_folders(clean_dir, protected_dirs, exclude=exclude)
    records = []
    for method in methods:
        for key, path in method.files.items():
            try:
                x0, x_adv = load_image(clean.files[key]).rgb[None], load_image(path).rgb[None]
            except ImageFileError:
                continue  # left out of the evaluation already, with a warning
            if x_adv.shape != x0.shape:
                continue  # evaluate warns about mismatched sizes already
            before = latent_distance(model, fit(x_adv[0])[None], fit(x0[0])[None])
            for purification in purifications:
                with torch.no_grad():
                    a, b = purification(x_adv, model)[0], purification(x0, model)[0]
                after = latent_distance(model, fit(a)[None], fit(b)[None])
                value = survival_ratio(after, before).item()
                scenario = f"purify-{purification.name}"
                records.append(Record(method.name, scenario, None, key, SURVIVING_METRIC, value))
    return records


def parse_purify_option(spec: str | None) -> list:
    """``--purify jpeg75,blur`` -> purifications; None -> []; a CLIError names the option."""
    from ..purify import parse_purifications
    from .errors import CLIError

    if not spec:
        return []
    try:
        return parse_purifications(spec)
    except ValueError as error:
        raise CLIError(f"--purify: {error}") from error


def add_surviving_distortion(
    result, clean_dir: Path, protected_dirs, purifications, model, resolution: int, exclude=()
) -> None:
    """Append the surviving latent distortion to an evaluation: records, plus one note per method.

    The notes put the figures in report.html; metrics.csv/json get every per-image value.
    """
    from functools import partial

    from ..evaluation import summarize
    from ..mimicry import fit_image

    if not purifications:
        return
    fit = partial(fit_image, resolution=resolution)
    records = surviving_records(clean_dir, protected_dirs, purifications, model, fit, exclude)
    result.records.extend(records)
    means: dict[str, list[str]] = {}
    for s in summarize(records):
        means.setdefault(s.source, []).append(f"{s.scenario.removeprefix('purify-')} {s.mean:.2f}")
    for source, cells in means.items():
        result.notes.append(
            f"{source}: surviving latent distortion ||E(p(x_adv)) - E(p(x0))|| / "
            f"||E(x_adv) - E(x0)|| (1 = intact, 0 = removed): {', '.join(cells)}."
        )
