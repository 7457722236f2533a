"""Options shared by several commands, declared once (as the ``hf`` CLI does)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..defaults import DEFAULT_METHOD, DEFAULT_MODEL

ModelOpt = Annotated[
    str,
    typer.Option("--model", help="hub id, local diffusers folder, or a .safetensors/.ckpt file"),
]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        help="for a single-file model: a diffusers folder of the same family, or a folder "
        "holding only a CLIP tokenizer/ (works offline)",
    ),
]
# protect: repeatable, one value per --model for an ensemble
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        help="hub id, local diffusers folder, or a .safetensors/.ckpt file; repeat it to protect "
        f"against several models at once (default {DEFAULT_MODEL})",
    ),
]
ModelWeightOpt = Annotated[
    list[float] | None,
    typer.Option(
        "--model-weight",
        help="weight of each --model in the ensemble: repeat it, once per --model in order "
        "(default equal); only the ratios matter",
    ),
]
ModelConfigsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-config",
        help="for a single-file model: a diffusers folder of the same family, or a folder "
        "holding only a CLIP tokenizer/ (works offline); "
        "with several --model, repeated once per model, in order, 'auto' for none",
    ),
]
FamilyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--family",
        help="sd1, sd2-base, sd2-v, sdxl or auto (default: detected from the files); with "
        "several --model, repeated once per model, in order",
    ),
]
# mimic, evaluate, purify, ui: one model
FamilyOneOpt = Annotated[
    str | None,
    typer.Option(
        "--family",
        help="sd1, sd2-base, sd2-v, sdxl or auto (default: detected from the files; a single SD "
        "2.x file is taken as sd2-v)",
    ),
]

# the numbering of mimicshield.models.CLIP_SKIP_NUMBERING, written out so --help imports no torch
CLIP_SKIP_HELP = (
    "text encoder layer the prompt is read from: 1 = the last (default), 2 = the penultimate "
    "('clip skip 2' of many anime SD 1.x fine-tunes), as model cards, A1111 and civitai count; "
    "diffusers' clip_skip is one less"
)
# protect: one value per --model
ClipSkipsOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--clip-skip",
        help=CLIP_SKIP_HELP + "; with several --model, repeated once per model, in order",
    ),
]
# mimic, evaluate, purify, ui: one model
ClipSkipOpt = Annotated[int, typer.Option("--clip-skip", help=CLIP_SKIP_HELP)]


def family_or_none(family: str | None) -> str | None:
    """``auto`` and no value both mean: detect the family from the files."""
    return None if family in (None, "auto") else family


DeviceOpt = Annotated[str, typer.Option(help="auto, cuda, mps or cpu")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on CUDA with native bf16 and on CPUs with AMX; fp16 on other CUDA and "
        "on MPS; fp32 otherwise), fp32, fp16 or bf16"
    ),
]
SeedOpt = Annotated[int, typer.Option(help="random seed: same seed, inputs and device, same bytes")]
MethodOpt = Annotated[str, typer.Option(help="protection method (see `mimicshield methods`)")]

DEFAULTS = {"model": DEFAULT_MODEL, "method": DEFAULT_METHOD}


def check_device_options(device: str, dtype: str | None = None) -> None:
    """``--device`` and ``--dtype`` checked at the top of a command, as one line.

    Unchecked, a typo reaches the loader as a ValueError after the inputs were read, and is
    printed with the debugging hint meant for errors of the program itself.
    """
    from ..models import resolve_device, resolve_dtype
    from .errors import CLIError

    try:
        chosen = resolve_device(device)
    except ValueError as error:
        message = str(error).replace("`device`", "--device")
        raise CLIError(message if message.startswith("--") else f"--device: {message}") from None
    if dtype is None:
        return
    try:
        resolve_dtype(dtype, chosen)
    except ValueError as error:
        raise CLIError(str(error).replace("`dtype`", "--dtype")) from None


def check_family_option(family: str | None) -> None:
    """``--family`` (one model) checked at the top of a command, as one line."""
    from ..families import FAMILIES
    from .errors import CLIError

    name = family_or_none(family)
    if name is not None and name not in FAMILIES:
        raise CLIError(f"--family must be one of auto, {', '.join(FAMILIES)}; got {name!r}.")


def check_clip_skip_option(clip_skip: int) -> None:
    """``--clip-skip`` checked at the top of a command, as one line."""
    from ..models import check_clip_skip
    from .errors import CLIError

    try:
        check_clip_skip(clip_skip)
    except ValueError as error:
        raise CLIError(str(error).replace("clip skip", "--clip-skip", 1)) from None
