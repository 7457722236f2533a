"""Serving the page: :func:`launch` on 127.0.0.1 unless told otherwise, and stopping it cleanly.

Gradio's upload cache is pointed into the service's folder, so stopping the app removes every
upload with the jobs.
"""

import os
from dataclasses import dataclass

from .page import build_app
from .service import ProtectionService
from .uploads import _one_line

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


@dataclass
class RunningApp:
    """A launched app: its URL, and :meth:`close` to stop it and remove its files."""

    url: str
    demo: object
    service: ProtectionService
    _previous_temp: str | None = None

    def close(self) -> None:
        try:
            self.demo.close()
        finally:
            self.service.close()
            _restore_env("GRADIO_TEMP_DIR", self._previous_temp)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _private_launch_options() -> dict:
    """Gradio 6 keeps a run history (inputs and outputs) in the browser: not for private art."""
    import inspect

    import gradio as gr

    parameters = inspect.signature(gr.Blocks.launch).parameters
    return {"run_history": False} if "run_history" in parameters else {}


def launch(
    service: ProtectionService,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    open_browser: bool = False,
    block: bool = True,
    quiet: bool = False,
    preload: bool = True,
) -> RunningApp:
    """Serve the page. ``block=False`` returns at once (tests); otherwise it returns on Ctrl-C.
    ``preload`` starts loading the default model as the page opens (off: at the first job).

    Gradio's upload cache is pointed into the service's folder (``GRADIO_TEMP_DIR``), so
    :meth:`RunningApp.close` removes uploads too; ``max_file_size`` makes Gradio refuse
    oversized uploads before they are written.
    """
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(service.cache_dir)
    running = None
    try:
        demo = build_app(service)
        try:
            _, url, _ = demo.launch(
                server_name=host,
                server_port=port,
                share=share,
                inbrowser=open_browser,
                prevent_thread_lock=True,
                max_file_size=service.limits.max_file_bytes,
                allowed_paths=[str(service.work_root)],
                show_error=False,
                quiet=quiet,
                ssr_mode=False,
                **_private_launch_options(),
            )
        except OSError as error:  # Gradio's advice names its own environment variables
            where = f"port {port}" if port else "a free port from 7860"
            reason = _one_line(error).split(". ")[0]  # not its advice, which is for Python
            raise OSError(
                f"Cannot listen on {host}, {where} ({reason}); choose another with --port."
            ) from None
        running = RunningApp(url or f"http://{host}:{demo.server_port}/", demo, service, previous)
        if preload:
            service.preload()  # in a thread of its own
        if block:
            demo.block_thread()
    finally:
        if running is None:
            service.close()
            _restore_env("GRADIO_TEMP_DIR", previous)
        elif block:
            running.close()
    return running
