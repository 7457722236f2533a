"""``mimicshield ui``: a local web app, for the artists and photographers who do not use terminals.

The package reads bottom-up, each module importing only those above it in this list:

- :mod:`.uploads`: what a tab may upload, checked by content, size and pixels, kept once;
- :mod:`.settings`: :class:`ProtectSettings`, every option of ``mimicshield protect``;
- :mod:`.jobs`: the records of a job (progress, results, previews) that the page reads;
- :mod:`.service`: :class:`ProtectionService`, everything the page does, without Gradio: one
  model loaded, one job at a time, Cancel, the SDEdit check, every temporary file;
- :mod:`.render`: the page's HTML (progress bars, messages, summaries);
- :mod:`.page`: :func:`build_app`, the Gradio page wired to the service;
- :mod:`.serve`: :func:`launch`, which serves it on 127.0.0.1 unless told otherwise.

Everything the CLI and the tests use is importable from ``mimicshield.webapp`` itself.
"""

from .jobs import (
    PREVIEW_SIZE,
    CheckResult,
    ImageResult,
    Job,
    JobCancelled,
    JobProgress,
    amplify,
    format_seconds,
)
from .page import (
    ADVANCED,
    LABELS,
    NO_CATEGORY,
    NOT_STARTED,
    PRESETS,
    ROBUST_LABELS,
    build_app,
    robust_choices,
)
from .page import _settings_from_page as _settings_from_page
from .render import (
    check_summary,
    image_summary,
    job_summary,
    message_html,
    messages_html,
    render_progress,
    results_table,
    upload_summary,
)
from .serve import LOOPBACK_HOSTS, RunningApp, is_loopback, launch
from .service import (
    CHECK_STRENGTH,
    STALE_SECONDS,
    ZIP_NAME,
    ProtectionService,
    lpips_unavailable,
    run_beside,
)
from .settings import ProtectSettings, per_model, split_values
from .uploads import (
    ALLOWED_FORMATS,
    ALLOWED_FORMATS_TEXT,
    Upload,
    UploadLimits,
    UploadRoom,
    protected_name,
    validate_uploads,
)
from .uploads import _check_upload as _check_upload
from .uploads import _unique_names as _unique_names

__all__ = [
    "ADVANCED",
    "ALLOWED_FORMATS",
    "ALLOWED_FORMATS_TEXT",
    "CHECK_STRENGTH",
    "LABELS",
    "LOOPBACK_HOSTS",
    "NOT_STARTED",
    "NO_CATEGORY",
    "PRESETS",
    "PREVIEW_SIZE",
    "ROBUST_LABELS",
    "STALE_SECONDS",
    "ZIP_NAME",
    "CheckResult",
    "ImageResult",
    "Job",
    "JobCancelled",
    "JobProgress",
    "ProtectSettings",
    "ProtectionService",
    "RunningApp",
    "Upload",
    "UploadLimits",
    "UploadRoom",
    "amplify",
    "build_app",
    "check_summary",
    "format_seconds",
    "image_summary",
    "is_loopback",
    "job_summary",
    "launch",
    "lpips_unavailable",
    "message_html",
    "messages_html",
    "per_model",
    "protected_name",
    "render_progress",
    "results_table",
    "robust_choices",
    "run_beside",
    "split_values",
    "upload_summary",
    "validate_uploads",
]
