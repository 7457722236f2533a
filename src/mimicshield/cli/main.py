"""Entry point: registers the subcommands and turns known errors into one-line messages."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from . import bench as bench_command
from . import evaluate as evaluate_command
from . import methods as methods_command
from . import mimic as mimic_command
from . import protect as protect_command
from . import purify as purify_command
from . import ui as ui_command
from .errors import CLIError

app = typer.Typer(
    name="mimicshield",
    help="Protect images against diffusion-based mimicry (Xue et al., ICLR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
MAX_MEGAPIXELS_VARIABLE = "MIMICSHIELD_MAX_MEGAPIXELS"


def _print_version(asked: bool) -> None:
    if asked:
        from .. import __version__

        typer.echo(f"mimicshield {__version__}")
        raise typer.Exit()


@app.callback()
def _settings(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version"
    ),
) -> None:
    """Protect images against diffusion-based mimicry (Xue et al., ICLR 2024)."""
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (decompression bombs); a user who
    # trusts a larger scan or panorama raises the limit here, as no CLI user can in Python.
    megapixels = os.environ.get(MAX_MEGAPIXELS_VARIABLE)
    if megapixels:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = int(_megapixels(megapixels) * 1e6) // 2


def _megapixels(value: str) -> float:
    """``MIMICSHIELD_MAX_MEGAPIXELS`` as a positive, finite number of megapixels.

    Zero or less would make every file a "decompression bomb" (Pillow refuses images over
    twice the limit), and infinity is no pixel count.
    """
    try:
        number = float(value)
    except ValueError:
        raise CLIError(f"{MAX_MEGAPIXELS_VARIABLE}: not a number: {value!r}.") from None
    if not math.isfinite(number) or number <= 0:
        raise CLIError(
            f"{MAX_MEGAPIXELS_VARIABLE} must be a positive number of megapixels; got {value!r} "
            "(unset it for the default limit)."
        )
    return number


app.command("protect")(protect_command.protect)
app.command("methods")(methods_command.methods)
app.command("bench")(bench_command.bench)
app.command("mimic")(mimic_command.mimic)
app.command("evaluate")(evaluate_command.evaluate)
app.command("purify")(purify_command.purify)
app.command("ui")(ui_command.ui)


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..images import ImageFileError
    from ..models import ModelLoadError, hub_errors

    # hub_errors: OSError, ValueError and the network errors of a hub request (a proxy)
    return (CLIError, ImageFileError, ModelLoadError, *hub_errors())


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all about a bad input: no traceback hint after them."""
    from ..images import ImageFileError
    from ..models import ModelLoadError

    return (CLIError, ImageFileError, ModelLoadError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, as errors are: the file, line number and source line Python
    prints with it say nothing to someone running a command."""
    print("warning: " + " ".join(str(message).split()), file=sys.stderr)


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings printed by :func:`_show_warning`; the libraries' deprecation notices (about
    their own API, which a CLI user cannot act on) left out. MIMICSHIELD_DEBUG keeps Python's."""
    with warnings.catch_warnings():
        if not os.environ.get("MIMICSHIELD_DEBUG"):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = _show_warning
        yield


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``timeout``), handled as Ctrl-C is: the commands
    then say what was saved and how to continue, instead of the process dying silently."""


SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, the shell's code for a run ended by SIGTERM


_terminated = threading.Event()  # set by the handler: the 130 that follows exits 143


def _raise_terminated(signum, frame) -> None:
    _terminated.set()
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the app runs, SIGTERM raises :class:`Terminated`; a command's 130 (interrupted)
    then exits 143, as a run ended by SIGTERM does. Signals go to the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except SystemExit as exit_:
        if exit_.code == 130 and _terminated.is_set():
            raise SystemExit(SIGTERM_EXIT_CODE) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    """Run the app; known errors print ``Error: ...`` on stderr and exit 1, warnings one
    ``warning: ...`` line each; SIGTERM is handled as Ctrl-C (exit status 143)."""
    try:
        with _one_line_warnings(), _sigterm_as_interrupt():
            app()
    except Exception as error:  # SystemExit (--help, exit codes) is not an Exception
        if os.environ.get("MIMICSHIELD_DEBUG") or not isinstance(error, _known_errors()):
            raise
        print(f"Error: {error}", file=sys.stderr)
        if not isinstance(error, _input_errors()):  # about the user's input: complete
            print("(set MIMICSHIELD_DEBUG=1 for a full traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
