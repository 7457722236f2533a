"""The Gradio page: its layout, and its events wired to :class:`ProtectionService`.

Why Gradio: it is what the ML ecosystem ships demos and local tools with (Mist's WebUI too), it
gives drag-and-drop uploads, downloads and a job queue shared by all browser tabs out of the box,
and it runs from ``pip install`` with no Node toolchain. Its queue matters most here: several
tabs must wait for the one GPU, not fight over it.
"""

# No `from __future__ import annotations`: Gradio reads the `gr.Request` annotations of the
# event handlers at runtime to inject the request, and string annotations hide them.
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..images import IMAGE_SUFFIXES, ImageFileError
from ..methods import METHODS
from ..protector import CATEGORY_PROMPTS
from ..robust import ROBUST_TRANSFORMS
from .jobs import CheckResult, Job, JobCancelled, JobProgress
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
from .service import STALE_SECONDS, ProtectionService, run_beside
from .settings import ProtectSettings, split_values
from .uploads import _one_line

PRESETS = {"light": 8, "standard": 16}  # name -> eps in 1/255 units

ADVANCED = [  # (name, label): the advanced options, in the order of `mimicshield protect --help`
    ("method", "Method"),
    ("steps", "Steps"),
    ("step_size", "Step size α (in 1/255)"),
    ("category", "Category (uses the paper's prompt)"),
    ("prompt", "Prompt c (empty: 'a photo')"),
    ("target", "Target image (photoguard, mist, sdst-)"),
    ("model_weight", "Ensemble weights, one per model line (empty: equal)"),
    ("model_config", "Config folder of a single-file model (one per model line, 'auto' for none)"),
    ("family", "Family: auto, sd1, sd2-base, sd2-v or sdxl (one per model line)"),
    (
        "clip_skip",
        "Clip skip: 1 = last text encoder layer, 2 = penultimate (A1111's count; one per model "
        "line, or one for all)",
    ),
    ("device", "Device"),
    ("dtype", "Precision"),
    ("seed", "Seed"),
    ("batch_size", "Batch size (images of equal size; 0: as many as the GPU holds)"),
    ("posterior", "E(x): posterior sample or mean"),
    ("sdst_r", "sdst- weight r"),
    (
        "robust",
        "Harden against purification (EOT): the clean-ups to withstand; none ticked: no hardening",
    ),
    ("low_memory", "Low memory (slower)"),
    ("compile_networks", "torch.compile (slow first step, faster later)"),
    ("cuda_graphs", "CUDA graphs: replay each step (small batches; experimental)"),
    ("nondeterministic", "CUDA: faster non-deterministic kernels (a seed may not repeat exactly)"),
    ("work_size", "Work size: empty for the measured default, 'native', or pixels (shorter side)"),
    ("tile_size", "Tile size"),
    ("file_format", "Output format (JPEG is lossy: it weakens the protection)"),
    ("quality", "JPEG quality"),
    ("metadata", "Write the 'no AI/ML training' XMP notice"),
    ("strip_metadata", "Privacy: remove EXIF (GPS too), XMP and text comments (ICC kept)"),
]
NO_CATEGORY = "none"
LABELS = dict(ADVANCED)
ROBUST_LABELS = {  # what each --robust name means to someone who has not read the paper
    "jpeg": "JPEG compression",
    "resize": "resizing",
    "blur": "blur",
    "noise": "added noise",
    "none": "the unchanged image too (mixed in with the ticked clean-ups)",
}


def robust_choices() -> list[tuple[str, str]]:
    """(label, --robust name) for each EOT transform: "none" alone, next to jpeg and blur,
    read as "no hardening", which it is not: it adds the unchanged image to the mix."""
    return [(ROBUST_LABELS.get(name, name), name) for name in ROBUST_TRANSFORMS]


def _page_number(values: dict[str, object], name: str, whole: bool = False) -> float:
    """A number box of the page, or a message naming the box (an emptied box gives None)."""
    value = values.get(name)
    label = LABELS.get(name, name).split(" (")[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{label}: enter a number.") from None
    if whole and not number.is_integer():
        raise ValueError(f"{label}: enter a whole number; got {number:g}.")
    return int(number) if whole else number


def _page_clip_skips(value: object) -> tuple[int, ...]:
    """The clip skip box: one whole number for every model, or one per model line; empty: 1."""
    text = value if isinstance(value, str) else _as_text(value)  # type: ignore[arg-type]
    parts = split_values(text, "\n, ") or ("1",)
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"Clip skip: enter whole numbers; got {', '.join(parts)}.") from None


def _as_text(values: Sequence[object] | None) -> str:
    """A tuple of per-model values as the page shows it: one per line, blank when all unset."""
    if not values or all(v is None for v in values):
        return ""
    return "\n".join(
        "auto" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values
    )


def _settings_from_page(
    service: ProtectionService, values: dict[str, object], preset: str, custom_eps: float
) -> ProtectSettings:
    """The page's widgets -> settings; every check of the CLI runs in ``ProtectSettings``."""
    eps = PRESETS.get(preset, custom_eps)
    weights = split_values(str(values.get("model_weight") or ""), "\n, ")
    try:
        model_weight = tuple(float(w) for w in weights) or None
    except ValueError:
        raise ValueError(f"Ensemble weights must be numbers; got {', '.join(weights)}.") from None
    target = values.get("target")
    category = values.get("category")
    work_size = str(values.get("work_size") or "").strip()
    return replace(
        service.defaults,
        model=split_values(str(values.get("model") or "")) or service.defaults.model,
        model_weight=model_weight,
        model_config=str(values.get("model_config") or ""),
        family=str(values.get("family") or ""),
        clip_skip=_page_clip_skips(values.get("clip_skip")),
        device=str(values["device"]),
        dtype=str(values["dtype"]),
        method=str(values["method"]),
        eps=float(eps),
        steps=_page_number(values, "steps", whole=True),
        step_size=_page_number(values, "step_size"),
        prompt=(str(values.get("prompt") or "").strip() or None),
        category=None if category in (None, NO_CATEGORY) else str(category),
        target=service.validate_target(target) if target else None,
        seed=_page_number(values, "seed", whole=True),
        batch_size=_page_number(values, "batch_size", whole=True),
        posterior=str(values["posterior"]),
        sdst_r=_page_number(values, "sdst_r"),
        robust=tuple(values.get("robust") or ()),
        low_memory=bool(values["low_memory"]),
        compile_networks=bool(values["compile_networks"]),
        cuda_graphs=bool(values["cuda_graphs"]),
        nondeterministic=bool(values["nondeterministic"]),
        work_size=work_size or None,
        tile_size=_page_number(values, "tile_size", whole=True),
        file_format=str(values["file_format"]),
        quality=_page_number(values, "quality", whole=True),
        metadata=bool(values["metadata"]),
        strip_metadata=bool(values["strip_metadata"]),
    )


def build_app(service: ProtectionService):
    """The Gradio page. Serve it with ``GRADIO_TEMP_DIR`` set to ``service.cache_dir``, as
    :func:`~mimicshield.webapp.serve.launch` does, so uploads land in the service's folder."""
    import gradio as gr

    defaults = service.defaults
    preset_choices = [
        ("Light (ε = 8/255)", "light"),
        ("Standard (ε = 16/255, the paper's)", "standard"),
        ("Custom", "custom"),
    ]
    default_preset = next((k for k, v in PRESETS.items() if v == defaults.eps), "custom")
    picture = {"type": "filepath", "interactive": False, "height": 320}

    with gr.Blocks(
        title="mimicshield",
        analytics_enabled=False,
        delete_cache=(1800, STALE_SECONDS),
    ) as demo:
        gr.Markdown(
            "# mimicshield\nProtect your images against diffusion-model mimicry (img2img, "
            "inpainting, fine-tuning) with a nearly invisible perturbation "
            "(Xue et al., ICLR 2024). Your images stay on this computer."
        )
        device_info = gr.HTML(
            message_html(
                f"Model: {', '.join(defaults.model)} · device: {service.device_label()}",
                "info",
                "ms-device",
            )
        )
        job_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(
                    label="Images: drag and drop one or many",
                    file_count="multiple",
                    file_types=sorted(IMAGE_SUFFIXES),
                    elem_id="ms-upload",
                )
                upload_status = gr.HTML(elem_id="ms-upload-status")
                preset = gr.Radio(
                    preset_choices, value=default_preset, label="Strength", elem_id="ms-preset"
                )
                custom_eps = gr.Slider(
                    1,
                    64,
                    value=defaults.eps,
                    step=1,
                    label="Custom budget ε (in 1/255)",
                    visible=default_preset == "custom",
                    elem_id="ms-eps",
                )
                model = gr.Textbox(
                    value="\n".join(defaults.model),
                    label="Model: hub id, local diffusers folder or .safetensors file "
                    "(several lines: an ensemble)",
                    max_lines=4,
                    interactive=service.allow_model_choice,
                    elem_id="ms-model",
                )
                with gr.Row():
                    protect_button = gr.Button("Protect", variant="primary", elem_id="ms-protect")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="ms-cancel")
                with gr.Accordion("Advanced: every command-line option", open=False):
                    labels = dict(ADVANCED)

                    def opt(name: str) -> dict:
                        return {"label": labels[name], "elem_id": "ms-" + name.replace("_", "-")}

                    choose_model = service.allow_model_choice
                    advanced = {
                        "method": gr.Dropdown(
                            list(METHODS), value=defaults.method, **opt("method")
                        ),
                        # No `minimum=` on number boxes: Gradio's own refusal names no box and
                        # never reaches the progress box; ProtectSettings' messages do both.
                        "steps": gr.Number(value=defaults.steps, precision=0, **opt("steps")),
                        "step_size": gr.Number(value=defaults.step_size, **opt("step_size")),
                        "category": gr.Dropdown(
                            [NO_CATEGORY, *CATEGORY_PROMPTS],
                            value=defaults.category or NO_CATEGORY,
                            **opt("category"),
                        ),
                        "prompt": gr.Textbox(value=defaults.prompt or "", **opt("prompt")),
                        "target": gr.File(file_types=sorted(IMAGE_SUFFIXES), **opt("target")),
                        "target_status": gr.HTML(elem_id="ms-target-status"),
                        "model_weight": gr.Textbox(
                            value=_as_text(defaults.model_weight), **opt("model_weight")
                        ),
                        "model_config": gr.Textbox(
                            value=_as_text(defaults.model_config),
                            interactive=choose_model,
                            **opt("model_config"),
                        ),
                        "family": gr.Textbox(
                            value=_as_text(defaults.family),
                            interactive=choose_model,
                            **opt("family"),
                        ),
                        "clip_skip": gr.Textbox(
                            value=_as_text(defaults.clip_skip),
                            interactive=choose_model,
                            **opt("clip_skip"),
                        ),
                        "device": gr.Dropdown(
                            service.available_devices(), value=defaults.device, **opt("device")
                        ),
                        "dtype": gr.Dropdown(
                            ["auto", "fp32", "fp16", "bf16"], value=defaults.dtype, **opt("dtype")
                        ),
                        "seed": gr.Number(value=defaults.seed, precision=0, **opt("seed")),
                        "batch_size": gr.Number(
                            value=defaults.batch_size, precision=0, **opt("batch_size")
                        ),
                        "posterior": gr.Radio(
                            ["sample", "mean"], value=defaults.posterior, **opt("posterior")
                        ),
                        "sdst_r": gr.Number(value=defaults.sdst_r, **opt("sdst_r")),
                        "robust": gr.CheckboxGroup(
                            robust_choices(), value=list(defaults.robust), **opt("robust")
                        ),
                        "low_memory": gr.Checkbox(value=defaults.low_memory, **opt("low_memory")),
                        "compile_networks": gr.Checkbox(
                            value=defaults.compile_networks, **opt("compile_networks")
                        ),
                        "cuda_graphs": gr.Checkbox(
                            value=defaults.cuda_graphs, **opt("cuda_graphs")
                        ),
                        "nondeterministic": gr.Checkbox(
                            value=defaults.nondeterministic, **opt("nondeterministic")
                        ),
                        "work_size": gr.Textbox(value=defaults.work_size or "", **opt("work_size")),
                        "tile_size": gr.Number(
                            value=defaults.tile_size, precision=0, **opt("tile_size")
                        ),
                        "file_format": gr.Radio(
                            ["png", "jpeg"], value=defaults.file_format, **opt("file_format")
                        ),
                        "quality": gr.Slider(
                            1, 100, value=defaults.quality, step=1, **opt("quality")
                        ),
                        "metadata": gr.Checkbox(value=defaults.metadata, **opt("metadata")),
                        "strip_metadata": gr.Checkbox(
                            value=defaults.strip_metadata, **opt("strip_metadata")
                        ),
                    }
            with gr.Column(scale=3):
                progress_html = gr.HTML(elem_id="ms-progress-box")
                table = gr.Dataframe(
                    headers=["file", "status", "PSNR (dB)", "SSIM", "L∞ (/255)", "seconds", "note"],
                    interactive=False,
                    label="Results",
                    elem_id="ms-results",
                )
                downloads = gr.File(
                    label="Protected files: click one to download it",
                    file_count="multiple",
                    interactive=False,
                    elem_id="ms-downloads",
                )
                zip_button = gr.DownloadButton(
                    "Download all (.zip)", visible=False, elem_id="ms-zip"
                )
                chosen = gr.Dropdown([], label="Show", elem_id="ms-chosen")
                with gr.Row():
                    before = gr.Image(label="Before", **picture)
                    after = gr.Image(label="After (protected)", **picture)
                    perturbation = gr.Image(
                        label="Perturbation, amplified (grey = unchanged)", **picture
                    )
                image_metrics = gr.HTML()
                check_button = gr.Button(
                    "Check protection (SDEdit, strength 0.3)", elem_id="ms-check"
                )
                with gr.Row():
                    mimic_clean = gr.Image(label="Mimicry of the clean image", **picture)
                    mimic_protected = gr.Image(label="Mimicry of the protected image", **picture)
                check_html = gr.HTML()

        target_status = advanced.pop("target_status")  # a message, not an option
        target_file = advanced["target"]
        options = {"model": model, **advanced}
        page_inputs = {files, preset, custom_eps, *options.values()}

        # -- strength presets: choosing a preset sets ε; moving the slider means Custom

        def on_preset(choice: str):
            if choice in PRESETS:
                return gr.update(value=PRESETS[choice], visible=False)
            return gr.update(visible=True)

        preset.change(on_preset, preset, custom_eps, queue=False, show_progress="hidden")

        # -- uploads are checked as they arrive, and again when the job starts

        def on_upload(paths: list[str] | None, target_path: str | None, request: gr.Request):
            """New files: check them all; refused, repeated and left-out files leave the list
            (and the disk). Not on `change`: the list this returns would trigger it again."""
            if not paths:
                return "", gr.update()
            accepted, problems = service.accept_uploads(request.session_hash, paths, target_path)
            status = upload_summary([u.name for u in accepted], problems)
            kept = [str(u.path) for u in accepted]
            return status, (gr.update(value=kept or None) if problems else gr.update())

        def on_files_removed(paths: list[str] | None, target_path: str | None, request: gr.Request):
            service.release_uploads(request.session_hash, [*(paths or []), target_path])
            return upload_summary([Path(p).name for p in paths or []], [])

        quick = {"concurrency_limit": None, "show_progress": "hidden"}
        files.upload(on_upload, [files, target_file], [upload_status, files], **quick)
        files.delete(on_files_removed, [files, target_file], upload_status, **quick)
        files.clear(on_files_removed, [files, target_file], upload_status, **quick)

        def on_target(path: str | None, paths: list[str] | None, request: gr.Request):
            """A new target image is checked (and recorded, to be deleted with the tab)."""
            try:
                service.accept_target(request.session_hash, path, paths or [])
            except ImageFileError as error:
                return message_html(str(error), "error", "ms-target-error"), None
            return "", gr.update()

        def on_target_cleared(paths: list[str] | None, request: gr.Request):
            service.release_uploads(request.session_hash, paths or [])
            return ""

        target_file.upload(on_target, [target_file, files], [target_status, target_file], **quick)
        target_file.clear(on_target_cleared, files, target_status, **quick)

        # -- protect (one job at a time across all tabs) and cancel

        def arm(request: gr.Request):
            service.arm(request.session_hash)
            if service.busy:
                return message_html(
                    "Queued: another job is running (maybe in another tab); yours waits its turn.",
                    "warning",
                    "ms-queued",
                )
            return message_html("Starting…", "info", "ms-starting")

        def run_protect(data: dict, request: gr.Request):
            try:
                yield from protect_updates(data, request.session_hash)
            finally:  # ended before its job started (nothing to protect, bad settings)?
                service.disarm(request.session_hash)

        def protect_updates(data: dict, session: str):
            """Nothing on the page is cleared until the new job has results: the earlier ones
            stay on show (and on disk) through a job that is cancelled or fails."""
            if service.cancel_requested(session):
                yield {progress_html: message_html("Cancelled.", "warning")}
                return
            uploads, problems = service.validate(data[files] or [])
            if not uploads:
                text = problems or ["Add one or more images first (drag them onto the box)."]
                yield {progress_html: messages_html(text, "error", "ms-message")}
                return
            try:
                values = {name: data[component] for name, component in options.items()}
                settings = _settings_from_page(service, values, data[preset], data[custom_eps])
            except (ValueError, TypeError, ImageFileError) as error:
                yield {progress_html: message_html(str(error), "error")}
                return
            yield {progress_html: message_html("Starting…", "info")}

            def work(progress: JobProgress) -> Job:
                return service.protect(session, uploads, settings, progress)

            for progress, worker in run_beside(service, session, work):
                if worker.is_alive():
                    yield {progress_html: render_progress(progress)}
            if worker.error is not None:
                if isinstance(worker.error, JobCancelled):
                    text = "Cancelled: the job stopped before any image was finished."
                    kind = "warning"
                else:
                    text, kind = f"Protection failed: {_one_line(worker.error)}", "error"
                yield {progress_html: message_html(text, kind)}
                return
            job: Job = worker.result
            lines, kind = job_summary(job, problems)
            if not job.protected:  # nothing new to show: the earlier results stay
                yield {progress_html: messages_html(lines, kind, "ms-done")}
                return
            yield _job_outputs(job, lines, kind)

        def _job_outputs(job: Job, lines: list[str], kind: str) -> dict:
            protected = job.protected
            first = protected[0]
            return {
                job_state: job,
                device_info: message_html(
                    f"Model: {', '.join(job.settings.model)} · device: {job.device}",
                    "info",
                    "ms-device",
                ),
                progress_html: messages_html(lines, kind, "ms-done"),
                table: results_table(job),
                downloads: [str(i.output) for i in protected],
                zip_button: gr.update(value=str(job.zip_path), visible=bool(job.zip_path)),
                chosen: gr.update(choices=[i.name for i in protected], value=first.name),
                before: str(first.before),
                after: str(first.after),
                perturbation: str(first.perturbation),
                image_metrics: image_summary(job, first),
                mimic_clean: None,  # the earlier job's check
                mimic_protected: None,
                check_html: "",
            }

        outputs = [
            job_state,
            device_info,
            progress_html,
            table,
            downloads,
            zip_button,
            chosen,
            before,
            after,
            perturbation,
            image_metrics,
            mimic_clean,
            mimic_protected,
            check_html,
        ]
        protect_button.click(
            arm, None, progress_html, concurrency_limit=None, show_progress="hidden"
        ).then(
            run_protect,
            page_inputs,
            outputs,
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress="minimal",
            show_progress_on=[progress_html],
        ).failure(lambda: message_html(NOT_STARTED, "error", "ms-not-started"), None, progress_html)

        def on_cancel(request: gr.Request):
            """A job waiting behind another tab's would hear nothing until that one ends; a
            running job's progress says "Cancelling" at its next update."""
            if service.cancel(request.session_hash):
                return message_html("Cancelled: your job will not run.", "warning", "ms-cancelled")
            return gr.update()

        cancel_button.click(on_cancel, None, progress_html, **quick)

        # -- one image: before / after / perturbation

        def on_choose(job: Job | None, name: str | None):
            image = job.image(name) if job else None
            if image is None:
                return None, None, None, "", None, None, ""
            paths = (str(image.before), str(image.after), str(image.perturbation))
            return (*paths, image_summary(job, image), None, None, "")

        chosen.input(
            on_choose,
            [job_state, chosen],
            [before, after, perturbation, image_metrics, mimic_clean, mimic_protected, check_html],
            concurrency_limit=None,
            show_progress="hidden",
        )

        # -- the check, queued with the protection jobs

        def run_check(job: Job | None, name: str | None, request: gr.Request):
            try:
                yield from check_updates(job, name, request.session_hash)
            finally:
                service.disarm(request.session_hash)

        def check_updates(job: Job | None, name: str | None, session: str):
            if job is None or job.image(name) is None:
                yield message_html("Protect an image first, then check it.", "error"), None, None
                return

            def work(progress: JobProgress) -> CheckResult:
                return service.check(session, job, name, progress)

            for progress, worker in run_beside(service, session, work):
                if worker.is_alive():
                    yield render_progress(progress), gr.update(), gr.update()
            if worker.error is not None:
                if isinstance(worker.error, JobCancelled):
                    yield message_html("Check cancelled.", "warning"), None, None
                else:
                    text = f"Check failed: {_one_line(worker.error)}"
                    yield message_html(text, "error"), None, None
                return
            result: CheckResult = worker.result
            yield (
                check_summary(result),
                str(result.clean_mimicry),
                str(result.protected_mimicry),
            )

        check_button.click(
            arm, None, check_html, concurrency_limit=None, show_progress="hidden"
        ).then(
            run_check,
            [job_state, chosen],
            [check_html, mimic_clean, mimic_protected],
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress="minimal",
            show_progress_on=[check_html],
        ).failure(lambda: message_html(NOT_STARTED, "error", "ms-not-started"), None, check_html)

        def on_unload(request: gr.Request):
            service.end_session(request.session_hash)

        demo.unload(on_unload)
    demo.queue(default_concurrency_limit=1)
    return demo


# shown where "Starting…" would otherwise stay when Gradio refuses an event before it runs
NOT_STARTED = (
    "Not started: the app could not take what the page sent; the message in the corner of the "
    "page says why."
)
