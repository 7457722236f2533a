"""Rich progress bars (per image and overall, with ETA) and the end-of-run table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from ..runner import FileResult, RunReport


def counting_progress(console: Console) -> Progress:
    """One bar with done/total, elapsed time and ETA: for loops whose steps are images or
    training steps (mimic, evaluate, purify)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


class ProtectProgress:
    """Two bars on stderr: the current image (or batch) and the whole run, both with ETA.

    ``first_step_note``, if given, is printed once the first step is done, with ``{seconds}``
    filled in: how long the first step took (``--compile`` compiles during it).
    """

    def __init__(
        self, total_images: int, steps: int, console: Console, first_step_note: str | None = None
    ) -> None:
        self.first_step_note = first_step_note
        self._started_at: float | None = None
        self.steps = max(steps, 1)
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            # the overall bar moves step by step but counts images; the current one counts steps
            TextColumn("{task.fields[count]}", justify="right"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.total_images = total_images
        self.images_done = 0
        self.overall = self.progress.add_task(
            "all images", total=total_images * self.steps, count=self._images_count()
        )
        self.current = self.progress.add_task("", total=self.steps, visible=False, count="")
        self.batch = 1

    def _images_count(self) -> str:
        return f"{self.images_done}/{self.total_images} images"

    def __enter__(self) -> ProtectProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def image_started(self, item, batch: int) -> None:
        name = escape(item.path.name)  # a file name is text, not rich markup ("[bold].png")
        label = name if batch == 1 else f"{name} (+{batch - 1})"
        self.batch = batch
        if self._started_at is None:
            self._started_at = time.perf_counter()
        self.progress.reset(
            self.current, total=self.steps, description=label, visible=True, count=""
        )

    def step(self, step: int, total: int) -> None:
        # ``total`` exceeds the step count when a large image is protected tile by tile.
        self.progress.update(
            self.current, completed=step, total=total, count=f"step {step}/{total}"
        )
        self.progress.update(self.overall, advance=self.batch * self.steps / max(total, 1))
        if self.first_step_note and self._started_at is not None:
            seconds = time.perf_counter() - self._started_at
            self.progress.console.print(self.first_step_note.format(seconds=seconds))
            self.first_step_note = None

    def saving(self, item) -> None:
        """After the last step a large image spends seconds being quantized, written and
        measured: the current bar says so instead of sitting silent at 100 %."""
        self.progress.update(self.current, description=f"saving {escape(item.path.name)} ...")

    def image_done(self, result: FileResult) -> None:
        self.images_done += 1
        advance = 0 if result.status == "protected" else self.steps  # its steps never ran
        self.progress.update(self.overall, advance=advance, count=self._images_count())
        console = self.progress.console
        # soft_wrap: one message, one line, however long the path (logs are grepped)
        if result.status == "failed":
            console.print(f"[red]failed[/red] {result.error}", soft_wrap=True)
        elif result.status == "protected" and result.note:
            console.print(f"[yellow]note[/yellow] {result.input}: {result.note}", soft_wrap=True)
        if not console.is_terminal and result.status != "failed":
            # no bars in a log or under nohup: a line per image says how far the run is (the
            # count is of the images done, failed ones included: not "N images protected")
            done = f"{self.images_done}/{self.total_images} done"
            console.print(f"{done}: {result.status} {escape(result.input)}", soft_wrap=True)


def print_results(report: RunReport, seconds: float, console: Console | None = None) -> None:
    """The end-of-run table: file, PSNR, SSIM, achieved L-infinity and seconds; then failures."""
    console = console or Console()
    table = Table(title=f"mimicshield: {len(report.results)} file(s) in {seconds:.1f} s")
    for column in ("file", "status", "PSNR (dB)", "SSIM", "L∞ (/255)", "seconds"):
        if column == "file":  # fold long paths rather than cut them: the name must stay readable
            table.add_column(column, overflow="fold", ratio=1)
        else:
            table.add_column(
                column, justify="left" if column == "status" else "right", no_wrap=True
            )
    for r in report.results:
        table.add_row(
            r.input,
            r.status,
            _number(r.psnr, "{:.2f}"),
            _number(r.ssim, "{:.4f}"),
            _number(r.linf_255, "{:.0f}"),
            _number(r.seconds, "{:.2f}"),
        )
    console.print(table)
    if report.failures:
        console.print(f"[red]{len(report.failures)} file(s) failed:[/red]")
        for failure in report.failures:
            console.print(f"  {failure.error}", soft_wrap=True)


def _number(value: float | None, template: str) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return template.format(value)
