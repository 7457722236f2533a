"""``mimicshield bench``: the cost of a protection step, against the reference configuration.

Everything runs on the full-size Stable Diffusion v1 architecture with random weights (a step's
cost does not depend on the weight values), so nothing is downloaded. Three variants are timed:

``engine``
    What ``mimicshield protect`` runs: :class:`~mimicshield.protector.Protector` over a
    :class:`~mimicshield.models.LatentDiffusion` set up as ``load_models`` leaves it (frozen
    weights, no VAE decoder, the dtype policy), with ``--low-memory`` / ``--compile`` applied.
``reference``
    A port of one step of the reference code (Xue et al.'s Diff-Protect, which runs Mist, AdvDM
    and PhotoGuard through one ldm model), written out in :func:`reference_step` rather than made
    by slowing down the engine. fp32, batch 1, and every step it re-encodes the text, runs the
    target branch through the encoder and the UNet where the reference does, and keeps the UNet
    trainable with gradient checkpointing, so the UNet's weight gradients are computed.
``floor`` (SDS methods)
    The networks alone: one encoder forward and backward plus one UNet forward, which is all
    an SDS step needs. engine / floor is the engine's own overhead.

The engine and the floor run under PyTorch's deterministic mode, as ``protect`` does
(:mod:`mimicshield.reproducibility`); ``--nondeterministic`` measures both without it. The
reference runs without it, as the reference code does.

Each measurement is the median of ``steps`` step times after ``warmup`` steps. On CUDA, steps
are timed with events (no host sync inside the loop) and memory is
``torch.cuda.max_memory_allocated``; on the CPU, memory is the sampled peak RSS above the RSS
before any model was built (approximate).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor

from .attack import project_linf
from .configs import builtin_config
from .methods import MIST_SEMANTIC_WEIGHT, SDST_DEFAULT_R, add_noise, get_method
from .models import (
    LatentDiffusion,
    _quiet_loading,
    prepare_components,
    resolve_device,
    resolve_dtype,
)
from .mps import check_mps_dtype
from .performance import (
    apply_performance_options,
    attention_processors,
    fuse_group_norm_silu,
    release_cached_memory,
    synchronize,
    use_channels_last,
)
from .reproducibility import deterministic_algorithms
from .targets import target_pattern

DEFAULT_BENCH_METHODS = ("sds-", "advdm+", "mist", "photoguard")
BENCH_PROMPT = "a photo"
SDS_FAMILY = ("sds+", "sds-", "sdst-")
STEP_SIZE = 2 / 255  # 1/255 on the [0, 1] scale, in [-1, 1] units, as the paper's default
EPS = 32 / 255  # 16/255 on the [0, 1] scale


@dataclass(frozen=True)
class Architecture:
    """The configs of the three networks and the noise schedule; ``sd1`` for figures, ``tiny``
    for smoke tests."""

    name: str
    unet: dict
    vae: dict
    text: dict
    scheduler: dict

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel, times the UNet's own downsampling: the size granularity."""
        vae_factor = 2 ** (len(self.vae["block_out_channels"]) - 1)
        return vae_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)


def architecture(tiny: bool = False) -> Architecture:
    if not tiny:
        # the full-size SD v1.x networks, from the configs single files load with offline
        parts = ("unet", "vae", "text_encoder", "scheduler")
        return Architecture("sd1", *(builtin_config("sd1", part) for part in parts))
    from .testing import SD1_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE

    text = {**TINY_TEXT, "vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999}
    return Architecture("tiny", TINY_UNET, TINY_VAE, text, SD1_SCHEDULER)


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; every (method, batch, dtype) is one engine measurement."""

    res: int = 512
    device: str = "auto"
    methods: tuple[str, ...] = DEFAULT_BENCH_METHODS
    batches: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("auto",)
    steps: int = 10
    warmup: int = 3
    compile: bool = False
    compile_mode: str | None = None
    low_memory: bool = False
    channels_last: bool = False
    channels_first: bool = False
    cuda_graphs: bool = False
    fused_norm: bool = False
    deterministic: bool = True
    reference: bool = True
    floor: bool = True
    tiny: bool = False
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for method in self.methods:
            get_method(method)
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(
                f"--steps must be >= 1 and --warmup >= 0; got {self.steps} and {self.warmup}."
            )
        if self.channels_last and self.channels_first:
            raise ValueError("--channels-last and --channels-first exclude each other.")
        for dtype in self.dtypes:
            resolve_dtype(dtype, torch.device("cpu"))  # a typo fails before anything is built
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch sizes must be >= 1; got {list(self.batches)}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {self.threads}.")
        factor = architecture(self.tiny).latent_factor
        if self.res < factor or self.res % factor:
            raise ValueError(f"--res must be a positive multiple of {factor}; got {self.res}.")


@dataclass
class BenchResult:
    """One measured configuration; ``error`` is set instead of timings when it failed."""

    method: str
    variant: str  # "engine", "reference" or "floor"
    dtype: str
    batch: int
    low_memory: bool = False
    compiled: bool = False
    channels_last: bool = False
    channels_first: bool = False
    cuda_graphs: bool = False
    fused_norm: bool = False
    nondeterministic: bool = False
    step_ms: list[float] = field(default_factory=list)
    step_cpu_ms: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    error: str | None = None
    speedup_vs_reference: float | None = None
    memory_ratio_vs_reference: float | None = None
    overhead_vs_floor: float | None = None
    cpu_time_speedup_vs_reference: float | None = None
    cpu_time_overhead_vs_floor: float | None = None

    @property
    def label(self) -> str:
        """The variant and its options, e.g. ``"engine low-mem compiled"``."""
        options = (
            ("low-mem", self.low_memory),
            ("compiled", self.compiled),
            ("NHWC", self.channels_last),
            ("NCHW", self.channels_first),
            ("graphs", self.cuda_graphs),
            ("GN+SiLU", self.fused_norm),
            ("nondet", self.nondeterministic),
        )
        return " ".join([self.variant, *(name for name, on in options if on)])

    @property
    def ms_per_step(self) -> float | None:
        """The median step time, for the whole batch."""
        return statistics.median(self.step_ms) if self.step_ms else None

    @property
    def cpu_ms_per_step(self) -> float | None:
        """The median process CPU time of a step (CPU devices)."""
        return statistics.median(self.step_cpu_ms) if self.step_cpu_ms else None

    @property
    def ms_min_step(self) -> float | None:
        """The fastest step: steadier than the median on a machine shared with other work."""
        return min(self.step_ms) if self.step_ms else None

    @property
    def ms_per_image_step(self) -> float | None:
        return None if self.ms_per_step is None else self.ms_per_step / self.batch

    @property
    def s_per_image_100_steps(self) -> float | None:
        """Seconds to protect one image with the paper's 100 steps, at this batch size."""
        per_image = self.ms_per_image_step
        return None if per_image is None else per_image * 100 / 1000

    @property
    def compile_s(self) -> float | None:
        """First step minus a steady step: the one-off cost (compilation, autotuning, caches)."""
        if self.first_step_s is None or self.ms_per_step is None:
            return None
        return max(self.first_step_s - self.ms_per_step / 1000, 0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            ms_per_step=self.ms_per_step,
            ms_min_step=self.ms_min_step,
            cpu_ms_per_step=self.cpu_ms_per_step,
            ms_per_image_step=self.ms_per_image_step,
            s_per_image_100_steps=self.s_per_image_100_steps,
            compile_s=self.compile_s if self.compiled else None,
        )
        return data


@dataclass
class BenchReport:
    settings: BenchSettings
    environment: dict
    results: list[BenchResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        settings = asdict(self.settings)
        settings["architecture"] = architecture(self.settings.tiny).name
        return {
            "settings": settings,
            "environment": self.environment,
            "results": [result.to_dict() for result in self.results],
        }


# --- building the networks ---------------------------------------------------------------------


class FixedTokenizer:
    """Stands in for ``CLIPTokenizer``: a step's cost does not depend on the prompt's words."""

    model_max_length = 77

    def __init__(self, vocab_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(
            0, vocab_size, (1, self.model_max_length), generator=generator
        )

    def __call__(self, prompt: str, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.input_ids)


def build_networks(arch: Architecture, device: torch.device, *, seed: int = 0):
    """(vae, unet, text_encoder, alphas_cumprod) in fp32 with random weights, built on ``device``.

    Building under the device context initialises the weights there: seconds on a GPU, where
    initialising 1.1 B parameters on the CPU and copying them would take much longer.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with _quiet_loading(), torch.device(device):
        vae = AutoencoderKL(**arch.vae)
        unet = UNet2DConditionModel(**arch.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text))
    # from_config: the built-in scheduler config is a PNDM one; only its noise schedule is used
    scheduler = DDPMScheduler.from_config(arch.scheduler)
    alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
    return vae, unet, text_encoder, alphas_cumprod


def build_engine_model(
    arch: Architecture, device: torch.device, dtype: torch.dtype, *, seed: int = 0
) -> LatentDiffusion:
    """A LatentDiffusion set up the way ``load_models`` sets up a real checkpoint."""
    vae, unet, text_encoder, alphas_cumprod = build_networks(arch, device, seed=seed)
    with _quiet_loading():  # diffusers notes that ``to(dtype)`` bypasses from_pretrained
        vae_dtype = prepare_components(vae, [unet, text_encoder], device, dtype)
    return LatentDiffusion(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=FixedTokenizer(arch.text["vocab_size"]),
        alphas_cumprod=alphas_cumprod,
        scaling_factor=float(vae.config.scaling_factor),
        name=f"random {arch.name}",
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
    )


@dataclass
class ReferenceModel:
    """The networks as the reference code holds them: an ldm ``LatentDiffusion`` in fp32.

    ldm freezes the first stage (VAE) and the text encoder but leaves the UNet trainable, and SD
    v1's config turns on the UNet's gradient checkpointing; the full VAE (with its decoder) and
    the text encoder stay loaded.
    """

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    token_ids: Tensor
    alphas_cumprod: Tensor
    scaling_factor: float


def build_reference_model(arch: Architecture, device: torch.device, *, seed: int = 0):
    vae, unet, text_encoder, alphas_cumprod = build_networks(arch, device, seed=seed)
    for module in (vae, unet, text_encoder):
        module.eval()
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(True)
    unet.enable_gradient_checkpointing()
    token_ids = FixedTokenizer(arch.text["vocab_size"]).input_ids.to(device)
    return ReferenceModel(
        vae, unet, text_encoder, token_ids, alphas_cumprod, float(vae.config.scaling_factor)
    )


# --- the reference step ------------------------------------------------------------------------
# A port of what one attack step of the reference code computes, for timing only. The reference
# runs AdvDM, Mist, PhotoGuard (its "texture_only" mode) and the untargeted encoder attack
# ("texture_self_enhance") as advertorch's LinfPGDAttack over a module whose forward evaluates
# the encoder, the text encoder and the UNet loss for the input *and* for the target image, then
# calls ``loss.backward()``; SDS and SDST run a hand-written loop. Step-size schedules, clipping
# details and the per-step ``torch.cuda.empty_cache()`` of the SDS loop are left out: they do not
# change which networks run, and leaving them out can only flatter the reference.


def reference_encode(ref: ReferenceModel, x: Tensor) -> Tensor:
    """ldm's ``get_first_stage_encoding(encode_first_stage(x))``: a scaled posterior sample."""
    return ref.scaling_factor * ref.vae.encode(x).latent_dist.sample()


def reference_text(ref: ReferenceModel) -> Tensor:
    """ldm's ``get_learned_conditioning``: the text encoder runs again on every call."""
    return ref.text_encoder(ref.token_ids)[0]


def reference_semantic_loss(ref: ReferenceModel, z: Tensor, cond: Tensor) -> Tensor:
    """ldm's ``LatentDiffusion.forward``: a fresh t and noise, the UNet, the mean squared error."""
    t = torch.randint(0, ref.alphas_cumprod.shape[0], (z.shape[0],), device=z.device)
    noise = torch.randn_like(z)
    z_t = add_noise(z, t, noise, ref.alphas_cumprod)
    eps_hat = ref.unet(z_t, t, encoder_hidden_states=cond.expand(z.shape[0], -1, -1)).sample
    return (eps_hat - noise).pow(2).mean()


def reference_components(ref: ReferenceModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's ``get_components``: E(x), and L_S at E(x) with the text re-encoded."""
    z = reference_encode(ref, x)
    return z, reference_semantic_loss(ref, z, reference_text(ref))


def reference_loss_direction(
    ref: ReferenceModel, method: str, x: Tensor, x0: Tensor, target: Tensor
) -> Tensor:
    """AdvDM, Mist, PhotoGuard and the encoder attack as the reference computes their gradient.

    Both the input and the target go through encoder, text encoder and UNet (the target's L_S is
    computed and thrown away), and ``loss.backward()`` also accumulates a gradient into every
    UNet weight, as advertorch's attack loop does with a trainable UNet.
    """
    x = x.detach().requires_grad_(True)
    z_x, semantic = reference_components(ref, x)
    z_y, _ = reference_components(ref, x0 if method == "encoder" else target)
    textural = (z_x - z_y).pow(2).sum()
    losses = {
        "advdm+": semantic,
        "advdm-": -semantic,
        "mist": MIST_SEMANTIC_WEIGHT * semantic - textural,
        "photoguard": -textural,
        "encoder": textural,
    }
    losses[method].backward()
    return x.grad


def reference_sds_direction(
    ref: ReferenceModel, method: str, x: Tensor, target: Tensor, r: float = SDST_DEFAULT_R
) -> Tensor:
    """SDS(+/-) and SDST(-) as the reference's SDS loop computes them.

    The residual eps_hat - n comes from a no-grad pass (encoder, text encoder, UNet); the encoder
    then runs again with gradients for the vector-Jacobian product, and for SDST a third time
    for the textural term, with the target re-encoded. Each encoding samples the posterior
    afresh, as the reference does, where the engine's sds- uses one sample for both: the same
    cost, a slightly different direction (tests/test_formulas_misc.py pins both).
    """
    with torch.no_grad():
        z = reference_encode(ref, x)
        t = torch.randint(0, ref.alphas_cumprod.shape[0], (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        z_t = add_noise(z, t, noise, ref.alphas_cumprod)
        cond = reference_text(ref).expand(z.shape[0], -1, -1)
        residual = ref.unet(z_t, t, encoder_hidden_states=cond).sample - noise
    x = x.detach().requires_grad_(True)
    reference_encode(ref, x).backward(residual)
    direction = x.grad if method == "sds+" else -x.grad
    if method == "sdst-":
        with torch.no_grad():
            z_target = reference_encode(ref, target)
        x_tex = x.detach().requires_grad_(True)
        (reference_encode(ref, x_tex) - z_target).pow(2).sum().backward()
        direction = -(r * x.grad + x_tex.grad)
    return direction


def reference_step(ref: ReferenceModel, method: str, x: Tensor, x0: Tensor, target: Tensor):
    """One PGD step of the reference configuration: the direction, sign step and projection."""
    if method in SDS_FAMILY:
        direction = reference_sds_direction(ref, method, x, target)
    else:
        direction = reference_loss_direction(ref, method, x, x0, target)
    return project_linf(x.detach() + STEP_SIZE * direction.sign(), x0, EPS)


# --- timing and memory -------------------------------------------------------------------------


@dataclass
class StepTimes:
    """Step times after warm-up, and the first step (with its one-off costs) in seconds.

    ``cpu_ms`` is the process's CPU time per step, on CPU devices only: with ``--threads 1`` it
    measures the work itself, unaffected by other programs competing for the cores.
    """

    wall_ms: list[float]
    cpu_ms: list[float]
    first_step_s: float | None = None


class StepClock:
    """Marks the end of each step. On CUDA the marks are events, so timing adds no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list = []
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            synchronize(self.device)
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    def intervals_ms(self) -> list[float]:
        pairs = list(zip(self.marks[:-1], self.marks[1:], strict=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in pairs]
        return [(end - start) * 1000 for start, end in pairs]

    def cpu_intervals_ms(self) -> list[float]:
        pairs = zip(self.cpu_marks[:-1], self.cpu_marks[1:], strict=True)
        return [(end - start) * 1000 for start, end in pairs]

    def times(self, warmup: int) -> StepTimes:
        """For marks before and after each of ``max(warmup, 1) + steps`` steps: the steps after
        the warm-up (the first step is never timed), and the first step's time."""
        drop = max(warmup, 1)
        wall, cpu = self.intervals_ms(), self.cpu_intervals_ms()
        return StepTimes(wall[drop:], cpu[drop:], wall[0] / 1000 if warmup else None)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory over a block: CUDA's own counter, or a sampled reading elsewhere."""

    def __init__(self, device: torch.device, cpu_baseline: int | None) -> None:
        self.device = device
        self.cpu_baseline = cpu_baseline
        self.peak_bytes: int | None = None
        self.kind: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], int | None] | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.device.type == "mps":
            self._read, self.kind = torch.mps.driver_allocated_memory, "mps_driver_sampled"
        elif self.cpu_baseline is not None:
            self._read, self.kind = _rss_bytes, "cpu_rss_above_start_sampled"
        if self._read is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            value = self._read()
            if value is not None:
                self.peak_bytes = max(self.peak_bytes or 0, value)
            if self._stop.wait(0.01):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.kind and self.kind.startswith("cpu") and self.peak_bytes is not None:
            self.peak_bytes = max(self.peak_bytes - self.cpu_baseline, 0)


# --- the three variants ------------------------------------------------------------------------


def bench_images(batch: int, res: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, res, res), generator=generator).float() / 255


def time_engine(
    model: LatentDiffusion,
    method: str,
    images: Tensor,
    *,
    warmup: int,
    steps: int,
    cuda_graphs: bool = False,
    deterministic: bool = True,
) -> StepTimes:
    """``Protector.protect`` itself, timed from its step callback."""
    from .protector import Protector

    make = partial(
        Protector,
        model,
        method,
        prompt=BENCH_PROMPT,
        cuda_graphs=cuda_graphs,
        deterministic=deterministic,
    )
    first_step_s = None
    if warmup:
        # The first step pays for compilation, autotuning, graph recording, allocator growth.
        clock = StepClock(model.device)
        clock.mark()
        make(steps=warmup).protect(
            images, callback=lambda step, total: clock.mark() if step == 1 else None
        )
        first_step_s = clock.intervals_ms()[0] / 1000
    clock = StepClock(model.device)
    protector = make(steps=steps + 1)
    protector.protect(images, callback=lambda step, total: clock.mark())
    if cuda_graphs and protector.graph_replays == 0:  # else the row would time eager steps
        raise RuntimeError("CUDA graphs never replayed (not CUDA, or the capture fell back)")
    # marks after each step: ``steps`` intervals, the first step untimed
    return StepTimes(clock.intervals_ms(), clock.cpu_intervals_ms(), first_step_s)


def time_floor(
    model: LatentDiffusion,
    images: Tensor,
    *,
    warmup: int,
    steps: int,
    deterministic: bool = True,
) -> StepTimes:
    """The networks of one SDS step and nothing else: encoder forward+backward, UNet forward.

    ``deterministic`` as for the engine it is compared with, so that the ratio is the engine's
    own overhead.
    """
    with deterministic_algorithms(deterministic):
        return _time_floor(model, images, warmup=warmup, steps=steps)


def _time_floor(model: LatentDiffusion, images: Tensor, *, warmup: int, steps: int) -> StepTimes:
    device = model.device
    x = images.to(device) * 2 - 1
    batch = x.shape[0]
    cond = model.embed_prompt(BENCH_PROMPT).expand(batch, -1, -1)
    t = torch.randint(0, model.num_train_timesteps, (batch,), device=device)
    clock = StepClock(device)
    clock.mark()
    for _ in range(max(warmup, 1) + steps):
        x_in = x.to(model.vae_dtype).detach().requires_grad_(True)
        z = model.vae.encode(x_in).latent_dist.mean
        with torch.no_grad():
            eps_hat = model.unet(z.to(model.dtype), t, encoder_hidden_states=cond).sample
        z.backward(eps_hat.to(z.dtype))
        clock.mark()
    return clock.times(warmup)


def time_reference(
    ref: ReferenceModel, method: str, images: Tensor, *, warmup: int, steps: int
) -> StepTimes:
    """:func:`reference_step` in a loop, from a clean batch-1 image towards the built-in target."""
    device = ref.token_ids.device
    x0 = images.to(device) * 2 - 1
    height, width = x0.shape[-2:]
    target = (target_pattern(height, width)[None].to(device) * 2 - 1).expand_as(x0)
    x = x0.clone()
    clock = StepClock(device)
    clock.mark()
    for _ in range(max(warmup, 1) + steps):
        x = reference_step(ref, method, x, x0, target)
        clock.mark()
    return clock.times(warmup)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def _measure(
    result: BenchResult, device, cpu_baseline, timed: Callable[[], StepTimes]
) -> BenchResult:
    """Run ``timed`` into ``result``; a failure (out of memory, say) is recorded, not raised."""
    try:
        with PeakMemory(device, cpu_baseline) as memory:
            times = timed()
        result.step_ms, result.step_cpu_ms = times.wall_ms, times.cpu_ms
        result.first_step_s = times.first_step_s
        result.peak_memory_bytes, result.memory_kind = memory.peak_bytes, memory.kind
    except Exception as error:  # noqa: BLE001 - one bad configuration must not end the run
        result.error = _one_line(error)
    release_cached_memory(device)  # the traceback held the failed step's tensors; and the
    return result  # next configuration starts from the same pool


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# --- the run -----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Device and versions, for the figures' provenance."""
    import diffusers
    import transformers

    from . import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "mimicshield": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(
    settings: BenchSettings,
    on_result: Callable[[BenchReport, BenchResult], None] | None = None,
) -> BenchReport:
    """Measure every configuration of ``settings``; one set of networks is in memory at a time.

    ``on_result(report, result)`` runs after each measurement, e.g. to save partial results.
    """
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    report = BenchReport(settings, environment(device))
    cpu_baseline = _rss_bytes() if device.type == "cpu" else None

    def measure(result: BenchResult, timed: Callable[[], tuple]) -> None:
        report.results.append(_measure(result, device, cpu_baseline, timed))
        if on_result is not None:
            on_result(report, result)

    for dtype_name in settings.dtypes:
        dtype = check_mps_dtype(resolve_dtype(dtype_name, device), device)
        _bench_engine(settings, device, dtype, measure, report.environment)
        release_cached_memory(device)  # the networks went with the call's locals
    if settings.reference:
        _bench_reference(settings, device, measure)
        release_cached_memory(device)
    add_ratios(report.results)
    return report


def _bench_engine(settings: BenchSettings, device, dtype, measure, environment: dict) -> None:
    """The engine (and the floor) for one dtype, every batch size and method.

    The networks are set up as ``mimicshield protect`` sets them up for each method, which
    depends on whether the method runs the UNet and, with ``--low-memory``, whether it
    backpropagates through it.
    """
    groups: dict[tuple[bool, bool], list[str]] = {}
    for method in settings.methods:  # methods set up alike share one copy of the networks
        spec = get_method(method)
        setup = (spec.needs_unet, settings.low_memory and spec.backprops_unet)
        groups.setdefault(setup, []).append(method)
    for methods in groups.values():
        model = build_engine_model(architecture(settings.tiny), device, dtype, seed=settings.seed)
        environment.setdefault("attention", attention_processors(model))
        if settings.channels_last or settings.channels_first:
            use_channels_last(model, settings.channels_last)
        if settings.fused_norm:
            fuse_group_norm_silu(model.vae.encoder)
        apply_performance_options(
            model,
            [BENCH_PROMPT],
            settings.low_memory,
            settings.compile,
            method=methods[0],
            compile_mode=settings.compile_mode,
        )
        _bench_engine_methods(settings, model, methods, measure)
        del model
        release_cached_memory(device)


def _bench_engine_methods(settings: BenchSettings, model, methods: list[str], measure) -> None:
    timing = {"warmup": settings.warmup, "steps": settings.steps}
    flags = {
        "low_memory": settings.low_memory,
        "compiled": settings.compile,
        "channels_last": settings.channels_last,
        "channels_first": settings.channels_first,
        "cuda_graphs": settings.cuda_graphs,
        "fused_norm": settings.fused_norm,
        "nondeterministic": not settings.deterministic,
    }
    name = _dtype_name(model.dtype)
    sds_methods = [method for method in methods if method in SDS_FAMILY]
    for batch in settings.batches:
        images = bench_images(batch, settings.res, settings.seed)
        for method in methods:
            timed = partial(
                time_engine,
                model,
                method,
                images,
                cuda_graphs=settings.cuda_graphs,
                deterministic=settings.deterministic,
                **timing,
            )
            measure(BenchResult(method, "engine", name, batch, **flags), timed)
        if settings.floor and sds_methods:
            timed = partial(
                time_floor, model, images, deterministic=settings.deterministic, **timing
            )
            measure(BenchResult(sds_methods[0], "floor", name, batch, **flags), timed)


def _bench_reference(settings: BenchSettings, device, measure) -> None:
    """The reference configuration: fp32 and batch 1, as the reference code runs."""
    ref = build_reference_model(architecture(settings.tiny), device, seed=settings.seed)
    images = bench_images(1, settings.res, settings.seed)
    timing = {"warmup": settings.warmup, "steps": settings.steps}
    for method in settings.methods:
        timed = partial(time_reference, ref, method, images, **timing)
        measure(BenchResult(method, "reference", "fp32", 1), timed)


def add_ratios(results: Sequence[BenchResult]) -> None:
    """Speedup and memory ratio against the reference, and overhead against the floor.

    The reference protects one image at a time, so speedup compares time per image-step at any
    engine batch size; the memory ratio is only given at batch 1, where it compares like with like.
    On CPU devices the same ratios are also given in process CPU time.
    """
    references = {r.method: r for r in results if r.variant == "reference" and not r.error}
    floors = {_floor_key(r): r for r in results if r.variant == "floor" and not r.error}
    for result in results:
        if result.variant != "engine" or result.error:
            continue
        reference = references.get(result.method)
        if reference is not None:
            result.speedup_vs_reference = reference.ms_per_image_step / result.ms_per_image_step
            if reference.cpu_ms_per_step and result.cpu_ms_per_step:
                result.cpu_time_speedup_vs_reference = (
                    reference.cpu_ms_per_step / reference.batch
                ) / (result.cpu_ms_per_step / result.batch)
            peaks = (reference.peak_memory_bytes, result.peak_memory_bytes)
            if result.batch == reference.batch and all(peaks):
                result.memory_ratio_vs_reference = peaks[0] / peaks[1]
        floor = floors.get(_floor_key(result))
        if floor is not None and result.method in SDS_FAMILY:
            result.overhead_vs_floor = result.ms_per_step / floor.ms_per_step
            if floor.cpu_ms_per_step and result.cpu_ms_per_step:
                result.cpu_time_overhead_vs_floor = result.cpu_ms_per_step / floor.cpu_ms_per_step


def _floor_key(result: BenchResult) -> tuple:
    return (
        result.dtype,
        result.batch,
        result.low_memory,
        result.compiled,
        result.channels_last,
        result.channels_first,
        result.fused_norm,
        result.nondeterministic,
    )


def results_from_reports(reports: Sequence[dict]) -> list[BenchResult]:
    """The results of saved JSON reports, with ratios recomputed across all of them.

    So a ``--low-memory`` or ``--compile`` run gets its ratios from the reference measured by
    another invocation of the same script on the same machine.
    """
    names = {f.name for f in fields(BenchResult)}
    ratios = {name for name in names if "_vs_" in name}
    results = [
        BenchResult(**{k: v for k, v in row.items() if k in names and k not in ratios})
        for report in reports
        for row in report["results"]
    ]
    add_ratios(results)
    return results


@dataclass(frozen=True)
class Target:
    """One of issue 4's targets for ``sds-``: which rows it reads, what, and the bound."""

    name: str
    rows: Callable[[BenchResult], bool]
    value: Callable[[BenchResult], float | None]
    limit: float
    at_most: bool  # True: the value must stay at or below the limit; False: reach it
    # which row to show: the best one (a target any offered configuration may meet), or the
    # worst (one that every configuration must meet)
    worst: bool = False

    def met_by(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def pick(self, measured: list[tuple[float, BenchResult]]) -> tuple[float, BenchResult]:
        largest = self.at_most == self.worst
        return (max if largest else min)(measured, key=lambda pair: pair[0])


def _sds_engine(result: BenchResult) -> bool:
    return result.method == "sds-" and result.variant == "engine" and not result.error


def _peak_gib(result: BenchResult) -> float | None:
    measured = result.memory_kind == "cuda_max_allocated" and result.peak_memory_bytes
    return result.peak_memory_bytes / 2**30 if measured else None


ISSUE_TARGETS = (
    Target(
        "batched: at most 10 ms per image-step",
        lambda r: _sds_engine(r) and r.batch > 1 and not r.low_memory,
        lambda r: r.ms_per_image_step,
        10.0,
        True,
    ),
    Target(
        "one image: at most 25 ms per step",
        lambda r: _sds_engine(r) and r.batch == 1 and not r.low_memory,
        lambda r: r.ms_per_step,
        25.0,
        True,
    ),
    Target(
        "peak GPU memory at batch 1: at most 3.0 GiB",
        lambda r: _sds_engine(r) and r.batch == 1 and not r.low_memory,
        _peak_gib,
        3.0,
        True,
    ),
    Target(
        "--low-memory peak: at most 2.0 GiB",
        lambda r: _sds_engine(r) and r.batch == 1 and r.low_memory,
        _peak_gib,
        2.0,
        True,
    ),
    Target(
        "at least 5x faster than the reference",
        _sds_engine,
        lambda r: r.speedup_vs_reference,
        5.0,
        False,
    ),
    Target(
        "at least 2x less memory than the reference",
        _sds_engine,
        lambda r: r.memory_ratio_vs_reference,
        2.0,
        False,
    ),
    Target(
        "engine within 1.2x of the bare networks (worst row)",
        _sds_engine,
        lambda r: r.overhead_vs_floor,
        1.2,
        True,
        worst=True,
    ),
)


def targets_table(reports: Sequence[dict]) -> str:
    """Issue 4's targets against saved reports, as Markdown: for each, the configuration that
    comes closest (for the floor ratio, the furthest) and whether it is met."""
    results = results_from_reports(reports)
    lines = ["| target | configuration | measured | met? |", "|---|---|---|---|"]
    for target in ISSUE_TARGETS:
        measured = [(target.value(r), r) for r in results if target.rows(r)]
        measured = [(value, r) for value, r in measured if value is not None]
        if not measured:
            lines.append(f"| {target.name} | - | not measured | - |")
            continue
        value, row = target.pick(measured)
        where = f"{row.label}, {row.dtype}, batch {row.batch}"
        met = "yes" if target.met_by(value) else "no"
        lines.append(f"| {target.name} | {where} | {value:.2f} | {met} |")
    return "\n".join(lines)


def markdown_table(reports: Sequence[dict]) -> str:
    """The results of saved JSON reports as one Markdown table, for BENCHMARKS.md."""

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| method | variant | dtype | batch | ms/step | ms/image-step | s/image (100 steps) "
        "| peak GiB | x faster | x less memory | / floor | first step s |",
        "|" + "---|" * 12,
    ]
    for result in results_from_reports(reports):
        cells = [result.method, result.label, result.dtype, str(result.batch)]
        if result.error:
            cells += [f"failed: {result.error}"] + [""] * 7
        else:
            peak = result.peak_memory_bytes
            approximate = "" if result.memory_kind == "cuda_max_allocated" else "~"
            cells += [
                number(result.ms_per_step),
                number(result.ms_per_image_step),
                number(result.s_per_image_100_steps, 2),
                "-" if peak is None else f"{approximate}{peak / 2**30:.2f}",
                number(result.speedup_vs_reference, 2),
                number(result.memory_ratio_vs_reference, 2),
                number(result.overhead_vs_floor, 2),
                number(result.first_step_s, 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
