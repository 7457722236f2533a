"""``mimicshield bench``: time protection steps on the full-size SD v1 architecture."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import DeviceOpt

EXAMPLES = """
Examples:
  mimicshield bench --res 512 --batch 1,8 --dtype bf16 --json-out bench.json
  mimicshield bench --device cpu --res 128 --steps 2 --warmup 1 --methods sds-
"""


def _split(values: list[str] | None, default: str) -> list[str]:
    """Options that take a comma list, a repeated option, or both: ``--batch 1,8 --batch 16``."""
    items = [item.strip() for value in (values or [default]) for item in value.split(",")]
    return [item for item in items if item]


def _batches(values: list[str] | None) -> tuple[int, ...]:
    from .errors import CLIError

    try:
        return tuple(int(item) for item in _split(values, "1"))
    except ValueError as error:
        raise CLIError(f"--batch takes whole numbers, e.g. --batch 1,8; got {values}.") from error


def _number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _memory(result) -> str:
    if result.peak_memory_bytes is None:
        return "-"
    approximate = "" if result.memory_kind == "cuda_max_allocated" else "~"
    return f"{approximate}{result.peak_memory_bytes / 2**30:.2f} GiB"


def result_line(result) -> str:
    """One line per measured configuration, printed as it finishes (runs can be long)."""
    what = f"{result.method} {result.label} {result.dtype} batch {result.batch}"
    if result.error:
        return f"[red]failed[/red] {what}: {result.error}"
    return f"done {what}: {result.ms_per_step:.1f} ms/step, {_memory(result)}"


def print_report(report, console) -> None:
    """The results as one table, the ratios against the reference and the floor included."""
    from rich.table import Table

    env = report.environment
    table = Table(
        title=f"mimicshield bench: {report.settings.res}px, {env['device_name']}, {env['date']}",
        caption="x faster: reference ms per image-step / this one. x less mem: reference peak / "
        "this peak, at batch 1. / floor: this step / the bare networks of an SDS step.",
    )
    columns = ["method", "variant", "dtype", "batch", "ms/step", "ms/img-step", "s/img@100"]
    columns += ["peak mem", "x faster", "x less mem", "/ floor", "1st step s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "variant") else "right")
    for result in report.results:
        table.add_row(
            result.method,
            result.label,
            result.dtype,
            str(result.batch),
            _number(result.ms_per_step),
            _number(result.ms_per_image_step),
            _number(result.s_per_image_100_steps, 2),
            _memory(result),
            _number(result.speedup_vs_reference, 2),
            _number(result.memory_ratio_vs_reference, 2),
            _number(result.overhead_vs_floor, 2),
            _number(result.first_step_s, 2),
        )
    console.print(table)
    for result in report.results:
        if result.error:
            console.print(
                f"failed: {result.method} {result.label} {result.dtype} "
                f"batch {result.batch}: {result.error}"
            )


def bench(
    res: Annotated[int, typer.Option(help="image size in pixels (square)")] = 512,
    device: DeviceOpt = "auto",
    batch: Annotated[
        list[str] | None, typer.Option(help="batch sizes: a comma list, or repeat the option")
    ] = None,
    methods: Annotated[str, typer.Option(help="comma list of methods")] = (
        "sds-,advdm+,mist,photoguard"
    ),
    dtype: Annotated[
        list[str] | None, typer.Option(help="auto, fp32, fp16 or bf16: a comma list, or repeat")
    ] = None,
    steps: Annotated[int, typer.Option(help="timed steps; the median is reported")] = 10,
    warmup: Annotated[int, typer.Option(help="untimed steps first (compilation, autotuning)")] = 3,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile UNet and encoder")] = (
        False
    ),
    compile_mode: Annotated[str | None, typer.Option(help="a torch.compile mode")] = None,
    low_memory: Annotated[
        bool, typer.Option("--low-memory", help="checkpointing; SDS streams the UNet")
    ] = False,
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last",
            help="NHWC convolution weights (the default on AMX CPUs; to measure on GPUs)",
        ),
    ] = False,
    channels_first: Annotated[
        bool,
        typer.Option(
            "--channels-first",
            help="NCHW convolution weights (the default elsewhere; to measure NHWC against)",
        ),
    ] = False,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs", help="replay each step from a CUDA graph")
    ] = False,
    fused_norm: Annotated[
        bool,
        typer.Option(
            "--fused-norm",
            help="VAE encoder GroupNorm+SiLU pairs keep only their input (part of --low-memory)",
        ),
    ] = False,
    nondeterministic: Annotated[
        bool,
        typer.Option(
            "--nondeterministic",
            help="engine and floor without deterministic mode, cuDNN autotuning on (what it costs)",
        ),
    ] = False,
    reference: Annotated[
        bool, typer.Option(help="also time the reference configuration (fp32, batch 1)")
    ] = True,
    floor: Annotated[bool, typer.Option(help="also time the bare networks of an SDS step")] = True,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="the tiny test architecture (smoke tests only)")
    ] = False,
    json_out: Annotated[Path | None, typer.Option(help="write the results as JSON here")] = None,
    seed: Annotated[int, typer.Option(help="seed for the random weights and images")] = 0,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's, all cores)")
    ] = None,
) -> None:
    """Time each method's protection step against the reference configuration.

    Full-size SD v1 networks with random weights (a step's cost does not depend on the weight
    values), so nothing is downloaded.
    """
    from rich.console import Console

    from ..bench import BenchSettings, run_bench
    from ..images import write_text_atomically
    from .errors import CLIError
    from .options import check_device_options

    check_device_options(device)
    try:
        settings = BenchSettings(
            res=res,
            device=device,
            methods=tuple(_split([methods], "")),
            batches=_batches(batch),
            dtypes=tuple(_split(dtype, "auto")),
            steps=steps,
            warmup=warmup,
            compile=compile,
            compile_mode=compile_mode,
            low_memory=low_memory,
            channels_last=channels_last,
            channels_first=channels_first,
            cuda_graphs=cuda_graphs,
            fused_norm=fused_norm,
            deterministic=not nondeterministic,
            reference=reference,
            floor=floor,
            tiny=tiny,
            seed=seed,
            threads=threads,
        )
    except ValueError as error:  # its own checks name the option, but two
        message = str(error).replace("`dtype`", "--dtype")
        raise CLIError(f"--methods: {message}" if "method" in message else message) from None
    if json_out is not None and (problem := json_out_problem(json_out)) is not None:
        raise CLIError(problem)  # found now, not after minutes of timing
    err = Console(stderr=True)
    command = " ".join(["mimicshield", *sys.argv[1:]])

    def save(report) -> None:
        if json_out is not None:
            report.environment["command"] = command
            write_text_atomically(json_out, json.dumps(report.to_dict(), indent=2) + "\n")

    def on_result(report, result) -> None:
        err.print(result_line(result))
        save(report)  # a run cut short still leaves what it measured

    report = run_bench(settings, on_result=on_result)
    report.environment["command"] = command
    save(report)
    console = Console()
    print_report(report, console if console.is_terminal else Console(width=160))
    if json_out is not None:
        err.print(f"Wrote {json_out}")


bench.__doc__ = (bench.__doc__ or "") + "\n" + EXAMPLES


def json_out_problem(path: Path) -> str | None:
    """Why ``--json-out`` cannot be written, or None; said before the benchmark runs.

    An existing file is replaced only when it holds earlier bench results (the JSON this
    command writes): anything else may be a file of the user's.
    """
    if path.is_dir():
        return f"--json-out {path}: is a folder; give a file name."
    if path.exists():
        if not _is_bench_json(path):
            return (
                f"--json-out {path}: exists and does not hold earlier bench results; choose "
                "another name, or move the file."
            )
        return _writable(path, path.parent)
    existing = next(folder for folder in path.absolute().parents if folder.exists())
    if not existing.is_dir():
        return f"--json-out {path}: cannot write there ({existing} is a file)."
    return _writable(path, existing)


def _is_bench_json(path: Path) -> bool:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and {"settings", "environment", "results"} <= content.keys()


def _writable(path: Path, folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (and ``path`` replaced), else why not."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"--json-out {path}: cannot write there ({error.strerror or error})."
    return None
