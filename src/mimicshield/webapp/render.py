"""The page's HTML: progress bars, messages and the tables and summaries of jobs and checks.

Plain functions from the service's records to HTML strings (every text escaped), so the page
and the tests read the same words without a browser.
"""

import html
import math
from collections.abc import Sequence

from .jobs import CheckResult, ImageResult, Job, JobProgress, format_seconds
from .service import CHECK_STRENGTH


def _bar(fraction: float, label: str, elem_id: str) -> str:
    percent = f"{100 * max(0.0, min(fraction, 1.0)):.1f}%"
    return (
        f'<div id="{elem_id}" style="margin:6px 0">'
        '<div style="height:10px;border-radius:5px;background:rgba(128,128,128,.25)">'
        f'<div style="height:10px;border-radius:5px;width:{percent};'
        'background:var(--color-accent, #f97316)"></div></div>'
        f'<div style="font-size:.9em;opacity:.85">{html.escape(label)}</div></div>'
    )


def _cancelling_text(progress: JobProgress) -> str:
    """What Cancel is waiting for: nothing (no step has run: loading, queued, reading the
    image), the step that runs, or the image being saved."""
    if progress.saving:
        return "Cancelling: stopping once this image is saved…"
    if progress.run_started is None or progress.step == 0:
        return "Cancelling…"
    return "Cancelling: stopping when this step ends…"


def render_progress(progress: JobProgress) -> str:
    """Two bars, this image and all images, each with its ETA."""
    phase = _cancelling_text(progress) if progress.cancel_requested else progress.phase
    parts = [f'<div id="ms-progress"><b>{html.escape(phase)}</b>']
    if progress.run_started is not None and progress.total_images:
        name = progress.current + (f" (+{progress.batch - 1})" if progress.batch > 1 else "")
        if progress.saving:
            where = "saving the file and measuring PSNR and SSIM"
        else:
            where = (
                f"step {progress.step}/{progress.total_steps or '?'}"
                f" · ETA {format_seconds(progress.image_eta())}"
            )
        parts.append(_bar(progress.image_fraction, f"This image: {name} · {where}", "ms-image-bar"))
        parts.append(
            _bar(
                progress.overall_fraction,
                f"All images: {progress.done_images}/{progress.total_images} done"
                f" · ETA {format_seconds(progress.overall_eta())}",
                "ms-overall-bar",
            )
        )
    parts.append("</div>")
    return "".join(parts)


def message_html(text: str, kind: str = "info", elem_id: str = "ms-message") -> str:
    colours = {"info": "inherit", "error": "#dc2626", "ok": "#16a34a", "warning": "#d97706"}
    return (
        f'<div id="{elem_id}" class="ms-{kind}" style="color:{colours[kind]}">'
        f"{html.escape(text)}</div>"
    )


def messages_html(lines: Sequence[str], kind: str, elem_id: str) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    colour = "#dc2626" if kind == "error" else "inherit"
    return f'<div id="{elem_id}" class="ms-{kind}" style="color:{colour}"><ul>{items}</ul></div>'


def _number(value: float | None, template: str) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else template.format(value)


def results_table(job: Job) -> list[list[str]]:
    return [
        [
            image.name,
            image.status,
            _number(image.psnr, "{:.2f}"),
            _number(image.ssim, "{:.4f}"),
            _number(image.linf_255, "{:.0f}"),
            _number(image.seconds, "{:.2f}"),
            image.error or image.note or "",
        ]
        for image in job.images
    ]


def image_summary(job: Job, image: ImageResult | None) -> str:
    if image is None:
        return ""
    text = (
        f"{image.name}: PSNR {_number(image.psnr, '{:.2f}')} dB · SSIM "
        f"{_number(image.ssim, '{:.4f}')} · L∞ {_number(image.linf_255, '{:.0f}')}/255 "
        f"(budget {job.settings.eps:g}/255)"
    )
    return message_html(text, "info", "ms-image-metrics")


def check_summary(result: CheckResult) -> str:
    if result.lpips_clean is None:
        lines = [result.lpips_note or "LPIPS unavailable."]
    else:
        lines = [
            f"LPIPS to the clean image — mimicry of the clean image: {result.lpips_clean:.4f}; "
            f"mimicry of the protected image: {result.lpips_protected:.4f}.",
            f"LPIPS between the two mimicries: {result.lpips_between:.4f}. Higher means the "
            "protection pushed the mimicry further from your image.",
        ]
    lines.append(
        f"SDEdit strength {CHECK_STRENGTH}, same seed, at {result.resolution} px (the square crop "
        "an attacker would use)."
    )
    return messages_html(lines, "info", "ms-check-result")


def job_summary(job: Job, problems: Sequence[str] = ()) -> tuple[list[str], str]:
    """The lines that end a job, and their kind. The first line says how it ended: "Done" only
    when every image was protected; the time is the job's, not how long files are kept."""
    protected, failed = len(job.protected), [i for i in job.images if i.status == "failed"]
    took = format_seconds(job.seconds)
    if job.cancelled:
        first = f"Cancelled: {protected} image(s) were protected before you cancelled ({took})."
        first += " They are ready to download below."
    elif failed and not protected:
        first = f"Failed: none of the {len(failed)} image(s) could be protected."
    elif failed:
        first = f"Finished with errors: {protected} protected, {len(failed)} failed ({took})."
    else:
        first = f"Done: {protected} protected in {took}."
    lines = [first] + [i.error for i in failed if i.error] + list(problems)
    if failed and not protected:
        return lines, "error"
    return lines, "warning" if failed or job.cancelled or problems else "ok"


def upload_summary(names: Sequence[str], problems: Sequence[str]) -> str:
    """The message under the upload box: the images ready, and one line per file left out."""
    parts = []
    if names:
        ok = f"{len(names)} image(s) ready: " + ", ".join(names)
        parts.append(message_html(ok, "ok", "ms-upload-ok"))
    if problems:
        parts.append(messages_html(problems, "error", "ms-upload-errors"))
    return "".join(parts)
