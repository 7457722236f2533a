"""The web app without Gradio: :class:`ProtectionService` and the thread a job runs in.

The service validates uploads, keeps one model (or ensemble) loaded, runs one job at a time
through the CLI's own :func:`~mimicshield.runner.protect_files` (so outputs carry the same
metadata and ``manifest.json``), stops at the next step when cancelled, runs the SDEdit check,
and owns every temporary file. :func:`run_beside` runs a job in a thread and reports its
progress to the page.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch

from ..images import ImageFileError, load_image
from .jobs import (
    CheckResult,
    ImageResult,
    Job,
    JobCancelled,
    JobProgress,
    _preview_copies,
    _save_preview,
    amplify,
)
from .settings import ProtectSettings
from .uploads import (
    Upload,
    UploadLimits,
    UploadRoom,
    _check_upload,
    _one_line,
    _unique_names,
    protected_name,
    validate_uploads,
)

CHECK_STRENGTH = 0.3  # SDEdit strength of "Check protection"
ZIP_NAME = "mimicshield-protected.zip"
STALE_SECONDS = 2 * 3600  # session folders older than this, without a live tab, are removed
WAITING_FOR_LOAD = "Waiting for the previous model load to finish"  # see _models_or_cancel


def _session_folder_name(session: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64] or "anonymous"


def _user_manifest(path: Path, job: "Job") -> str:
    """The job's manifest.json as the user gets it in the zip: each ``input`` is the name of
    the file they uploaded, not the server's temporary copy (whose path names the session),
    and ``relative`` the file's name in the zip (the runner's is the name it derived the
    output from, ``photo-protected.jpg`` for a JPEG saved as ``photo-protected.png``)."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    uploaded = {str(image.input): image.uploaded_as or image.name for image in job.images}
    for entry in manifest.get("images", []):
        entry["input"] = uploaded.get(entry.get("input"), Path(str(entry.get("input"))).name)
        if entry.get("output"):
            entry["relative"] = entry["output"]
    return json.dumps(manifest, indent=2)


class ProtectionService:
    """Everything the page does, without Gradio: one model, one job at a time, temp files.

    Args:
        settings: the defaults shown in the page (the ``mimicshield ui`` options).
        limits: upload limits.
        allow_model_choice: whether the page may load another model than ``settings.model``.
            Off when the app is exposed beyond this computer: a path typed in a browser must not
            make the server read arbitrary local files.
        lpips_weights: ``lpips_alexnet.safetensors`` for the check (default: the same lookup
            as ``mimicshield evaluate``).
        work_root: where jobs and Gradio's upload cache live; a fresh temporary folder by
            default, removed by :meth:`close`.
    """

    def __init__(
        self,
        settings: ProtectSettings | None = None,
        *,
        limits: UploadLimits | None = None,
        allow_model_choice: bool = True,
        lpips_weights: str | Path | None = None,
        work_root: str | Path | None = None,
    ) -> None:
        self.defaults = settings or ProtectSettings()
        self.limits = limits or UploadLimits()
        self.allow_model_choice = allow_model_choice
        self.lpips_weights = lpips_weights
        self._owns_root = work_root is None
        root = tempfile.mkdtemp(prefix="mimicshield-ui-") if work_root is None else work_root
        self.work_root = Path(root)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.work_root / "uploads"  # Gradio's cache (GRADIO_TEMP_DIR)
        # Jobs live inside Gradio's cache: Gradio serves files there as they are, where it
        # copies any other file it shows into the cache, and a closed tab's copies would stay.
        self.sessions_dir = self.cache_dir / "sessions"
        self._gpu = threading.Lock()  # held while a job computes: one at a time
        self._model_lock = threading.Lock()
        # The model load running now, whoever started it: the preload, or a job that was
        # cancelled and left it running. One at a time; see _models_or_cancel.
        self._loader: _Worker | None = None
        self._loader_key: tuple | None = None  # the models it loads (ProtectSettings.model_key)
        self._loader_lock = threading.Lock()
        self._models: list = []
        self._auto_batch = None  # the batch-size rule of the loaded models
        self._model_key: tuple | None = None
        self._lpips = None
        # Cancellation belongs to each job: a tab's next job takes the flag armed for it, so
        # a Cancel pressed just before another Protect still stops the job that was running.
        self._armed: dict[str, threading.Event] = {}  # the flag a tab's next job takes
        self._checked: dict = {}  # upload check results, see validate_uploads
        self._running: dict[str, set[threading.Event]] = {}  # flags of a tab's started jobs
        self._uploads: dict[str, set[Path]] = {}  # Gradio's cached copies of a tab's uploads
        # tabs' upload events run at once: one at a time here, so the byte limits hold and
        # no tab deletes a file that another is just recording
        self._upload_lock = threading.RLock()
        self._ended: set[str] = set()  # closed tabs whose job is still stopping
        self.busy = False
        self.closed = False

    # -- devices and models

    def device_label(self, device: str | None = None) -> str:
        """``cuda (NVIDIA H100 80GB HBM3)``, ``mps`` or ``cpu``: what a job would run on."""
        from ..models import resolve_device

        try:
            chosen = resolve_device(device or self.defaults.device)
        except ValueError as error:
            return str(error)
        if chosen.type == "cuda":
            return f"{chosen} ({torch.cuda.get_device_name(chosen)})"
        return str(chosen)

    def available_devices(self) -> list[str]:
        from ..models import _mps_available

        devices = ["auto", "cpu"]
        if torch.cuda.is_available():
            devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if _mps_available():
            devices.append("mps")
        return devices

    def models_for(self, settings: ProtectSettings) -> list:
        """The loaded models (with their decoders, for the check), reloaded only when they must
        be. Several models make an ensemble; one set is kept in memory at a time."""
        chosen = (settings.model, settings.model_config, settings.family, settings.clip_skip)
        fixed = (
            self.defaults.model,
            self.defaults.model_config,
            self.defaults.family,
            self.defaults.clip_skip,
        )
        if not self.allow_model_choice and chosen != fixed:
            names = ("model", "model config", "family", "clip skip")
            changed = [name for name, a, b in zip(names, chosen, fixed, strict=True) if a != b]
            raise ValueError(
                "This app is reachable from other computers, so its model is fixed to "
                f"{', '.join(self.defaults.model)} (here the {' and '.join(changed)} differs); "
                "restart `mimicshield ui --model ...` to change it."
            )
        with self._model_lock:
            if self._models and self._model_key == settings.model_key:
                reused = self._reuse_models(settings.clip_skip, settings.chosen_prompt)
                if reused is not None:
                    return reused
            self._models, self._model_key = [], None
            from ..models import load_models
            from ..performance import (
                AutoBatchSize,
                apply_performance_options,
                release_cached_memory,
            )

            release_cached_memory()

            models = [
                load_models(
                    source,
                    device=settings.device,
                    dtype=settings.dtype,
                    with_decoder=True,
                    single_file_config=config,
                    family=family,
                    clip_skip=clip_skip,
                )
                for source, config, family, clip_skip in zip(
                    settings.model,
                    settings.model_config,
                    settings.family,
                    settings.clip_skip,
                    strict=True,
                )
            ]
            # measured before --compile, which would compile again for the measuring size
            self._auto_batch = AutoBatchSize(models, low_memory=settings.low_memory)
            if settings.low_memory or settings.compile_networks:
                prompts = [settings.chosen_prompt]  # protection's and the SDEdit check's
                for model in models:
                    apply_performance_options(
                        model, prompts, settings.low_memory, settings.compile_networks
                    )
            self._models, self._model_key = models, settings.model_key
            return models

    def _reuse_models(self, clip_skips: Sequence[int], prompt: str) -> list | None:
        """The loaded models at ``clip_skips`` (their weights do not depend on it), or None when
        a released text encoder (low memory, compile) cannot embed ``prompt``: a reload then.
        A clip skip deeper than a model's text encoder is refused as its load would refuse it."""
        from ..models import at_clip_skip

        models = [
            at_clip_skip(model, clip_skip)
            for model, clip_skip in zip(self._models, clip_skips, strict=True)
        ]
        try:
            for model in models:
                model.embed_prompt(prompt)  # the check's too
        except RuntimeError:
            return None
        self._models = models
        return models

    def preload(self) -> None:
        """Start loading the default model(s) while the page opens, so the first Protect does
        not spend its first seconds (minutes for a hub download) importing diffusers and
        reading weights. Returns at once; a failure is the first job's to report, in the page."""
        self._load(self.defaults)

    def _load(self, settings: ProtectSettings) -> tuple["_Worker", bool]:
        """The thread that runs :meth:`models_for`, and whether it was started now for
        ``settings``: False when another load still runs (its models may be other ones)."""
        with self._loader_lock:
            if self._loader is not None and self._loader.is_alive():
                return self._loader, False
            self._loader = _Worker(partial(self.models_for, settings), name="mimicshield-load")
            self._loader_key = settings.model_key
            self._loader.start()
            return self._loader, True

    def _models_or_cancel(
        self, settings: ProtectSettings, cancel: threading.Event, progress: JobProgress, phase: str
    ) -> list:
        """:meth:`models_for`, but Cancel does not wait for a load to finish: the load goes on
        in its thread and this job stops now (within 0.2 s).

        A job that finds such a load still running (a cancelled job's, or the preload) says it
        waits for it, and starts its own load only once it is over. Loads take turns in
        :meth:`models_for` anyway; waiting here rather than on its lock lets the page say so,
        and leaves no second thread behind if this job is cancelled too. If that load was of
        the same models, its result is reused (:meth:`models_for` finds them loaded).
        """
        while True:
            loader, ours = self._load(settings)
            # the preload (or a cancelled job's load) of these very models is this job's load
            same = self._loader_key == settings.model_key
            progress.phase = phase if ours or same else WAITING_FOR_LOAD
            while loader.is_alive():
                loader.join(0.2)
                self._raise_if_cancelled(cancel)
            if ours:
                break
        if loader.error is not None:
            raise loader.error
        return loader.result  # type: ignore[return-value]

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """Hold the GPU lock (one job or check computes at a time), with ``busy`` set meanwhile:
        a Protect pressed then is told it is queued."""
        with self._gpu:
            self.busy = True
            try:
                yield
            finally:
                self.busy = False

    def _lpips_model(self):
        """LPIPS on the CPU (fast enough at 512 px), loaded once."""
        from ..evaluation import resolve_lpips_weights
        from ..metrics import LPIPS

        if self._lpips is None:
            self._lpips = LPIPS.from_file(resolve_lpips_weights(self.lpips_weights))
        return self._lpips

    # -- sessions and cancellation

    def arm(self, session: str) -> None:
        """Called when the user presses a run button, before the job waits in the queue: the
        coming job gets a flag of its own (an earlier job's Cancel stays in force)."""
        self._armed[session] = threading.Event()

    def cancel(self, session: str) -> bool:
        """Stop every job of this tab: the running one and the one waiting in the queue.

        Returns whether a job of this tab was waiting in the queue and none running: the page
        then says at once that it will not run (a running job's progress says "Cancelling").
        """
        armed = self._armed.get(session)  # set already: an earlier Cancel, said before
        waiting = armed is not None and not armed.is_set() and not self._is_running(session)
        self._armed.setdefault(session, threading.Event()).set()
        # tuple(): a copy taken in one step, as a job thread may leave the set meanwhile
        for event in tuple(self._running.get(session, ())):
            event.set()
        return waiting

    def disarm(self, session: str) -> None:
        """A run that ended before its job started gives back its unused flag, so that a later
        Cancel does not answer that a job is waiting. Not while a job of the tab runs: a flag
        armed then belongs to the tab's next click."""
        armed = self._armed.get(session)
        if armed is not None and not armed.is_set() and not self._is_running(session):
            self._armed.pop(session, None)

    def cancel_requested(self, session: str) -> bool:
        events = [*self._running.get(session, ()), self._armed.get(session)]  # copied at once
        return any(event is not None and event.is_set() for event in events)

    def _start_job(self, session: str) -> threading.Event:
        """The cancel flag of a job of ``session`` that starts now (armed, or a fresh one)."""
        event = self._armed.pop(session, None) or threading.Event()
        self._running.setdefault(session, set()).add(event)
        return event

    def _raise_if_cancelled(self, cancel: threading.Event) -> None:
        if cancel.is_set() or self.closed:
            raise JobCancelled()

    def _is_running(self, session: str) -> bool:
        return bool(self._running.get(session))

    def session_folder(self, session: str) -> Path:
        return self.sessions_dir / _session_folder_name(session)

    def end_session(self, session: str) -> None:
        """The tab was closed: stop its job and delete its files (once the job has stopped)."""
        self.cancel(session)
        if self._is_running(session):
            self._ended.add(session)
        else:
            self._forget(session)

    def remember_uploads(self, session: str, paths: Iterable[str | Path | None]) -> None:
        """Gradio's cached copies of the files a tab uploaded, deleted when the tab closes."""
        cache = self.cache_dir.resolve()
        with self._upload_lock:
            for path in (Path(p).resolve() for p in paths if p):
                if path.is_relative_to(cache):  # never a file outside the app's cache
                    self._uploads.setdefault(session, set()).add(path)

    def release_uploads(self, session: str, keep: Iterable[str | Path | None]) -> None:
        """Delete this tab's uploads that are not in ``keep`` (its image list and target):
        refused, left out, removed or replaced files go at once, not when the tab closes."""
        kept = {Path(p).resolve() for p in keep if p}
        with self._upload_lock:
            held = self._uploads.get(session, set())
            for path in [p for p in held if p not in kept]:
                held.discard(path)
                self._delete_upload(path)

    def _delete_upload(self, path: Path) -> None:
        """Delete an upload no tab holds any more. Gradio stores a file under the digest of its
        content and its name, so two tabs that upload the same file share one path."""
        if any(path in held for held in tuple(self._uploads.values())):
            return
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # Gradio's folder for it, unless it holds others
            path.parent.rmdir()

    def upload_bytes(self) -> int:
        """What every upload (all tabs, and any Gradio stored that no event reported) takes on
        disk: the upload cache without the job folders."""
        total = 0
        for folder, subfolders, names in os.walk(self.cache_dir):
            if Path(folder) == self.cache_dir:
                subfolders[:] = [d for d in subfolders if d != self.sessions_dir.name]
            for name in names:
                with contextlib.suppress(OSError):
                    total += (Path(folder) / name).stat().st_size
        return total

    def _room(self, session: str, paths: Sequence[Path]) -> UploadRoom:
        """The bytes ``paths``, the tab's image list, may take under the byte limits."""
        listed = {p.resolve() for p in paths if p.is_file()}
        listed_bytes = sum(p.stat().st_size for p in listed)
        own_other = sum(  # the tab's target image
            p.stat().st_size
            for p in self._uploads.get(session, ())
            if p not in listed and p.is_file()
        )
        others = self.upload_bytes() - listed_bytes
        return UploadRoom(
            tab_bytes_left=self.limits.tab_bytes - own_other,
            app_bytes_left=self.limits.max_total_bytes - others,
            limits=self.limits,
        )

    def accept_uploads(
        self, session: str, paths: Iterable[str | Path], target: str | Path | None = None
    ) -> tuple[list[Upload], list[str]]:
        """The check of a tab's image list when files arrive: every pixel decoded, repeats
        dropped, the byte limits applied; what is not kept is deleted from disk now."""
        paths = [Path(p) for p in paths]
        self.remember_uploads(session, [*paths, target])
        # the new files are decoded here, outside the lock every tab's uploads take
        validate_uploads(paths, self.limits, verify=True, checked=self._checked)
        with self._upload_lock:
            room = self._room(session, paths)
            accepted, problems = validate_uploads(
                paths, self.limits, room=room, verify=True, checked=self._checked
            )
            self.release_uploads(session, [*(u.path for u in accepted), target])
        return accepted, problems

    def accept_target(
        self, session: str, target: str | Path | None, images: Iterable[str | Path]
    ) -> str | None:
        """The check of a newly chosen target image, every pixel decoded: its path (None when
        cleared). A replaced or refused target is deleted at once; a refusal raises."""
        self.remember_uploads(session, [target])
        try:
            kept = self.validate_target(target, verify=True)
        except ImageFileError:
            self.release_uploads(session, images)
            raise
        self.release_uploads(session, [*images, kept])
        return kept

    def _forget(self, session: str) -> None:
        shutil.rmtree(self.session_folder(session), ignore_errors=True)
        with self._upload_lock:
            for path in self._uploads.pop(session, ()):
                self._delete_upload(path)
        self._armed.pop(session, None)
        self._ended.discard(session)

    def _leave(self, session: str, cancel: threading.Event) -> None:
        """A job of ``session`` is over."""
        self._running.get(session, set()).discard(cancel)
        if not self._is_running(session):
            self._running.pop(session, None)
            if session in self._ended:
                self._forget(session)

    def _sweep(self) -> None:
        """Remove the folders of sessions whose tabs went away without saying so."""
        if not self.sessions_dir.is_dir():
            return
        live = {_session_folder_name(s) for s in tuple(self._running)}
        now = time.time()
        for folder in self.sessions_dir.iterdir():
            if folder.name not in live and now - folder.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)

    # -- validation

    def validate(self, paths: Iterable[str | Path]) -> tuple[list[Upload], list[str]]:
        """The check when a job starts: headers and repeats (the pixels were checked on upload,
        and unchanged files are not read again)."""
        return validate_uploads(paths, self.limits, checked=self._checked)

    def validate_target(self, path: str | Path | None, verify: bool = False) -> str | None:
        if not path:
            return None
        try:
            return str(_check_upload(Path(path), Path(path).name, self.limits, verify).path)
        except ImageFileError as error:
            raise ImageFileError(f"Target image {error}") from None

    # -- protection

    def protect(
        self,
        session: str,
        uploads: Sequence[Upload],
        settings: ProtectSettings,
        progress: JobProgress | None = None,
    ) -> Job:
        """Protect ``uploads`` with ``settings`` into a fresh folder of this session.

        Blocks until done; raises :class:`JobCancelled` if cancelled before any image finished,
        otherwise returns the job with ``cancelled`` set and the finished images kept.

        The tab's earlier results stay until this job has protected something: a job that is
        cancelled, fails or protects nothing leaves them as they were (and its folder goes).
        Outputs are named ``STEM-protected.EXT``, so a download never takes the original's name.
        """
        progress = progress or JobProgress()
        if not uploads:
            raise ValueError("No images to protect.")
        cancel = self._start_job(session)
        folder = self.session_folder(session)
        job = Job(secrets.token_hex(4), folder / secrets.token_hex(4), settings)
        finished = False  # ran to its end without raising (cancelled after some images counts)
        try:
            self._sweep()
            files, by_path = self._copy_inputs(job, uploads)
            target = None
            if settings.target:
                target = load_image(self.validate_target(settings.target)).rgb
            progress.phase = "Waiting for the previous job to stop"
            with self._computing():
                self._raise_if_cancelled(cancel)
                loading = f"Loading {', '.join(settings.model)}"
                models = self._models_or_cancel(settings, cancel, progress, loading)
                dtype = str(models[0].dtype).removeprefix("torch.")
                job.device = f"{self.device_label(str(models[0].device))} · {dtype}"
                self._raise_if_cancelled(cancel)
                out_dir = job.folder / "protected"
                self._run(cancel, job, files, by_path, out_dir, models, target, progress)
            finished = True
        finally:  # the one way out, raised or not
            if finished and job.protected:
                self._remove_other_jobs(job)  # the new results replace the tab's earlier ones
            else:
                shutil.rmtree(job.folder, ignore_errors=True)
            self._leave(session, cancel)  # a closed tab's folder goes here
        return job

    def _copy_inputs(self, job: Job, uploads: Sequence[Upload]) -> tuple[list, dict]:
        """Copy the uploads into the job's folder under unique names; each one's output is
        ``STEM-protected.EXT`` (the runner names outputs after ``InputFile.relative``)."""
        from ..runner import InputFile

        inputs_dir = job.folder / "inputs"
        inputs_dir.mkdir(parents=True)
        files: list[InputFile] = []
        by_path: dict[str, ImageResult] = {}
        for upload, name in zip(uploads, _unique_names([u.name for u in uploads]), strict=True):
            path = inputs_dir / name
            shutil.copyfile(upload.path, path)
            files.append(InputFile(path, Path(protected_name(name))))
            by_path[str(path)] = ImageResult(name, path, uploaded_as=upload.name)
            job.images.append(by_path[str(path)])
        return files, by_path

    def _remove_other_jobs(self, job: Job) -> None:
        """The tab's earlier results, once ``job`` has results to show instead."""
        for folder in job.folder.parent.iterdir():
            if folder != job.folder and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def _run(self, cancel, job, files, by_path, out_dir, models, target, progress) -> None:
        from ..ensemble import Ensemble
        from ..runner import clip_skip_parameter, protect_files

        settings = job.settings
        single = len(models) == 1
        engine = models[0] if single else Ensemble(models, settings.model_weight)
        protector = settings.protector(engine, target)
        header = {  # the same manifest header as `mimicshield protect`
            "model": settings.model[0] if single else list(settings.model),
            "family": models[0].family if single else [m.family for m in models],
            **({} if single else {"model_weights": engine.weights}),
            "device": str(models[0].device),
            "dtype": str(models[0].dtype).removeprefix("torch."),
            "parameters": {
                **protector.config.to_dict(),
                "target": Path(settings.target).name if settings.target else None,
                "clip_skip": clip_skip_parameter(models),
            },
            "seed": settings.seed,
            "deterministic": protector.deterministic,
        }

        def image_started(item, batch: int) -> None:
            self._raise_if_cancelled(cancel)
            progress.phase = "Protecting"
            progress.start_image(by_path[str(item.path)].name, batch)

        def step(done: int, total: int) -> None:
            progress.on_step(done, total)
            self._raise_if_cancelled(cancel)  # the last check before the file is saved
            if done >= total:
                progress.phase = "Saving and measuring"
                progress.start_saving()

        def image_done(result) -> None:
            image = by_path[result.input]
            # messages name the user's file, not the server's temporary copy of it
            error = result.error.replace(result.input, image.uploaded_as) if result.error else None
            image.status, image.error, image.note = result.status, error, result.note
            image.psnr, image.ssim = result.psnr, result.ssim
            image.linf_255, image.seconds = result.linf_255, result.seconds
            if result.output:
                image.output = out_dir / result.output
            progress.done_images += 1
            progress.saving = False

        progress.phase = "Protecting"
        progress.start_run(len(files))
        started = time.perf_counter()
        try:
            protect_files(
                files,
                out_dir,
                protector,
                options=settings.output_options(m.native_size for m in models),
                batch_size=settings.batch_size
                or partial(self._auto_batch, tile_size=settings.tile_size, method=settings.method),
                manifest_header=header,
                on_image_start=image_started,
                on_step=step,
                on_image_done=image_done,
            )
        except JobCancelled:
            job.cancelled = True
            if not job.protected:
                raise
        job.seconds = time.perf_counter() - started
        for image in job.images:
            if image.status == "pending":
                image.status = "cancelled"
        progress.phase = "Preparing previews and the zip"
        for image in job.protected:
            self._previews(job, image)
        job.zip_path = self._zip(job, out_dir)

    def _previews(self, job: Job, image: ImageResult) -> None:
        """Before, after and the amplified perturbation, made from preview-size copies: the
        page shows them 320 px high, and full-size copies of a big photo cost gigabytes."""
        clean, clean_pixels = _preview_copies(image.input)
        protected, protected_pixels = _preview_copies(image.output)
        previews = job.folder / "previews" / Path(image.name).stem
        image.before = _save_preview(clean, previews / "before.png")
        image.after = _save_preview(protected, previews / "after.png")
        # sampled, not averaged pixels: averaging would wash the perturbation out to grey
        difference = amplify(protected_pixels, clean_pixels, job.settings.eps / 255)
        image.perturbation = _save_preview(difference, previews / "perturbation.png")

    def _zip(self, job: Job, out_dir: Path) -> Path | None:
        """Every protected file and the manifest, stored as they are (PNG is compressed)."""
        if not job.protected:
            return None
        path = job.folder / ZIP_NAME
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for image in job.protected:
                archive.write(image.output, image.output.relative_to(out_dir).as_posix())
            manifest = out_dir / "manifest.json"
            if manifest.is_file():
                archive.writestr(manifest.name, _user_manifest(manifest, job))
        return path

    # -- the check

    def check(
        self, session: str, job: Job, name: str, progress: JobProgress | None = None
    ) -> CheckResult:
        """SDEdit (strength 0.3, the job's seed) of the clean and the protected image, at the
        model's native resolution (the square crop an attacker feeds it), with LPIPS."""
        from ..images import save_png
        from ..mimicry import fit_image, model_resolution, sdedit

        progress = progress or JobProgress()
        image = job.image(name)
        if image is None:
            raise ValueError("Choose a protected image first.")
        if not (image.input.is_file() and image.output and image.output.is_file()):
            hours = STALE_SECONDS // 3600
            raise ValueError(
                f"These results have expired (files are kept {hours} hours after the last job); "
                "protect the images again."
            )
        cancel = self._start_job(session)
        try:
            progress.phase = "Waiting for the previous job to stop"
            with self._computing():
                self._raise_if_cancelled(cancel)
                loading = f"Loading {job.settings.model[0]}"
                models = self._models_or_cancel(job.settings, cancel, progress, loading)
                model = models[0]  # an ensemble's first
                resolution = model_resolution(model)
                clean = fit_image(load_image(image.input).rgb, resolution)
                protected = fit_image(load_image(image.output).rgb, resolution)
                progress.phase = "Check: SDEdit of the clean and the protected image"
                progress.start_run(1)
                progress.start_image(image.name, 1)

                def step(done: int, total: int) -> None:
                    progress.on_step(done, total)
                    self._raise_if_cancelled(cancel)

                outputs = sdedit(
                    model,
                    torch.stack([clean, protected]),
                    CHECK_STRENGTH,
                    prompt=job.settings.chosen_prompt,
                    seed=job.settings.seed,
                    callback=step,
                )
        finally:
            self._leave(session, cancel)
        folder = job.folder / "check" / Path(image.name).stem
        result = CheckResult(
            save_png(outputs[0], folder / "sdedit-clean.png"),
            save_png(outputs[1], folder / "sdedit-protected.png"),
            resolution,
        )
        try:
            lpips = self._lpips_model()
            with torch.no_grad():
                scores = lpips(outputs, torch.stack([clean, clean]))
                between = lpips(outputs[1:], outputs[:1])
            result.lpips_clean, result.lpips_protected = float(scores[0]), float(scores[1])
            result.lpips_between = float(between[0])
        except (FileNotFoundError, OSError, RuntimeError) as error:
            result.lpips_note = lpips_unavailable(error)
        return result

    def close(self) -> None:
        """Stop every job and delete every temporary file this app made."""
        self.closed = True
        for events in list(self._running.values()):
            for event in list(events):
                event.set()
        if self._owns_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
        else:
            shutil.rmtree(self.sessions_dir, ignore_errors=True)
            shutil.rmtree(self.cache_dir, ignore_errors=True)


# --- running a job beside the page ----------------------------------------------------------


class _Worker(threading.Thread):
    """Runs ``fn`` and keeps its result or its exception for the thread that polls it."""

    def __init__(self, fn: Callable[[], object], name: str = "mimicshield-job") -> None:
        super().__init__(daemon=True, name=name)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as error:  # reported to the page, never raised in the server
            self.error = error


def run_beside(
    service: ProtectionService,
    session: str,
    fn: Callable[[JobProgress], object],
    interval: float = 0.5,
) -> Iterator[tuple[JobProgress, _Worker]]:
    """Run ``fn(progress)`` in a thread; yield its progress every ``interval`` s, then once more
    when it has finished. If the page goes away mid-job, the job is cancelled."""
    progress = JobProgress()
    worker = _Worker(lambda: fn(progress))
    worker.start()
    try:
        while worker.is_alive():
            progress.cancel_requested = service.cancel_requested(session)
            yield progress, worker
            worker.join(interval)
        yield progress, worker
    finally:
        if worker.is_alive():
            service.cancel(session)


def lpips_unavailable(error: BaseException) -> str:
    """Why the check has no LPIPS scores, in words for the person at the page, and how whoever
    starts the app can add them (the CLI's own message speaks of --lpips-weights only)."""
    text = str(error)
    if "Could not download" in text:
        why = "the LPIPS weights could not be downloaded"
    elif "HF_HUB_OFFLINE" in text:
        why = "this app has no LPIPS weights, and downloads are switched off (HF_HUB_OFFLINE)"
    elif "not found" in text or "does not point to a file" in text:
        why = "the LPIPS weights file this app was given does not exist"
    else:
        why = f"the LPIPS weights could not be read ({_one_line(error)})"
    return (
        f"LPIPS scores unavailable: {why}. The two pictures above still show the mimicry. "
        "For the scores, start the app with the weights file: mimicshield ui --lpips-weights "
        "lpips_alexnet.safetensors (or set MIMICSHIELD_LPIPS_WEIGHTS to it)."
    )
