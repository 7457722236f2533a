"""``mimicshield ui``: the local web app (Gradio) for people who do not use terminals."""

from __future__ import annotations

import inspect
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
    family_or_none,
)

EXAMPLES = """
Examples:
  mimicshield ui                                   # http://127.0.0.1:7860, this computer only
  mimicshield ui --model ./stable-diffusion-v1-5 --open
  mimicshield ui --host 0.0.0.0 --port 8080        # reachable from your network: think first
"""


def ui(
    model: ModelOpt = DEFAULT_MODEL_ID,
    model_config: ModelConfigOpt = None,
    family: FamilyOneOpt = None,
    clip_skip: ClipSkipOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    host: Annotated[
        str, typer.Option(help="address to listen on; anything but 127.0.0.1 exposes the app")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="port (default: the first free one from 7860)")
    ] = None,
    share: Annotated[
        bool, typer.Option("--share", help="also publish a public gradio.live link (72 h)")
    ] = False,
    max_images: Annotated[int, typer.Option(help="most images per job")] = 50,
    max_file_mb: Annotated[float, typer.Option(help="largest upload, in MB")] = 50,
    max_megapixels: Annotated[float, typer.Option(help="largest image, in megapixels")] = 50,
    max_tab_gb: Annotated[
        float | None,
        typer.Option(
            help="most uploads one browser tab keeps on disk, in GB (default: a full job, "
            "--max-images x --max-file-mb)"
        ),
    ] = None,
    max_total_gb: Annotated[
        float, typer.Option(help="most uploads all tabs together keep on disk, in GB")
    ] = 10,
    lpips_weights: Annotated[
        Path | None,
        typer.Option(
            help="lpips_alexnet.safetensors for 'Check protection' (default: "
            "$MIMICSHIELD_LPIPS_WEIGHTS, else downloaded once to the cache)"
        ),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="open it in the browser")] = False,
) -> None:
    """Start the web app: drag and drop images, protect them, download the results.

    It listens on 127.0.0.1 (this computer only) unless --host or --share says otherwise.

    Browser tabs share one queue: one job runs at a time.

    Temporary files are deleted when the app stops.
    """
    import signal
    import sys

    from rich.console import Console

    from ..models import check_model_source, resolve_device
    from .errors import CLIError
    from .options import check_clip_skip_option

    check_clip_skip_option(clip_skip)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError(
            'The web app needs Gradio: pip install "gradio>=5" (or ".[ui]" in a checkout).'
        ) from None
    from ..webapp import ProtectionService, ProtectSettings, UploadLimits, is_loopback, launch

    if port is not None and not 1 <= port <= 65535:
        raise CLIError(f"--port {port}: a port is a number from 1 to 65535.")
    tab_gb = 1 if max_tab_gb is None else max_tab_gb  # None: derived, always positive
    limits = (max_images, max_file_mb, max_megapixels, max_total_gb, tab_gb)
    if min(limits) <= 0:
        raise CLIError(
            "--max-images, --max-file-mb, --max-megapixels, --max-tab-gb and --max-total-gb "
            "must be positive."
        )
    allow_pillow_pixels(int(max_megapixels * 1e6))
    resolve_device(device)  # fail now, not at the first job
    check_model_source(model)
    exposed = share or not is_loopback(host)
    err = Console(stderr=True)
    if exposed:
        err.print(
            "[yellow]warning:[/yellow] the app is reachable from other computers "
            f"({'a public share link' if share else host}). Anyone who can reach it can upload "
            "images and use this machine's GPU; there is no login. The model is fixed to "
            f"{model}."
        )
    service = ProtectionService(
        ProtectSettings(
            model=model,
            model_config=model_config,
            family=family_or_none(family),
            clip_skip=clip_skip,
            device=device,
            dtype=dtype,
        ),
        limits=UploadLimits(
            max_images=max_images,
            max_file_bytes=int(max_file_mb * 2**20),
            max_pixels=int(max_megapixels * 1e6),
            max_tab_bytes=None if max_tab_gb is None else int(max_tab_gb * 2**30),
            max_total_bytes=int(max_total_gb * 2**30),
        ),
        allow_model_choice=not exposed,
        lpips_weights=lpips_weights,
    )
    # `kill` (SIGTERM) ends the app like Ctrl-C, so its temporary files are removed too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    err.print(f"Temporary files: {service.work_root} (deleted when the app stops; Ctrl-C)")
    try:
        launch(service, host=host, port=port, share=share, open_browser=open_browser)
    finally:
        signal.signal(signal.SIGTERM, previous)


# cleandoc first: appended unindented lines would stop the help text from being dedented
ui.__doc__ = inspect.cleandoc(ui.__doc__ or "") + "\n" + EXAMPLES


def allow_pillow_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to the app's own limit, which then does the refusing.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (179 MP by default) as
    decompression bombs, so a ``--max-megapixels 300`` app said "more than 300 MP" of a 225 MP
    image. The limit is only ever raised.
    """
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2
