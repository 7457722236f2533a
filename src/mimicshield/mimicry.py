"""Mimicry simulations: what an attacker does with an image, run on clean and protected copies.

Six scenarios, five kinds (SDEdit in two forms), from the paper's evaluation (Xue et al., ICLR
2024, arXiv 2311.12832):

* ``sdedit-onestep`` / ``sdedit-ddim``: SDEdit without guidance. Noise the latent at one
  timestep of a 100-step DDIM schedule (eta 0), then predict x̂0 in one step or run DDIM down to
  0. Denoising starts at the timestep the noise was added at (the reference implementation
  starts one DDIM step later, which mismatches noise level and timestep).
* ``img2img``: diffusers' ``StableDiffusionImg2ImgPipeline`` with a prompt and guidance 7.5.
* ``inpaint``: diffusers' ``StableDiffusionInpaintPipeline`` with a given mask, or a centred
  ellipse that keeps the subject and regenerates the rest.
* ``textual-inversion`` and ``lora``: learn a token embedding, or DreamBooth-LoRA weights (peft),
  from the whole image set, then generate new images with the learned concept.

SDXL runs every scenario: its pipelines are diffusers' SDXL ones (``StableDiffusionXL...Pipeline``,
both text encoders), conditioned on the time ids of the uncropped image exactly as SDEdit's
``model.condition`` is. Its textual inversion learns the new token in both text encoders.

The maths of SDEdit is in small pure functions (``add_noise``, ``predict_x0``, ``ddim_step``,
``sdedit_timesteps``) so each can be checked against its formula. Images are (N, 3, H, W) in
[0, 1] everywhere; every stochastic step draws from a generator seeded per image, so clean and
protected copies of an image see the same noise.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from glob import escape as glob_escape
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .methods import loss_scale, v_target
from .models import (
    Conditioning,
    LatentDiffusion,
    encode_prompt_ids,
    sdxl_time_ids,
)
from .reproducibility import deterministic_algorithms

__all__ = [
    "IMG2IMG_STRENGTHS",
    "SCENARIOS",
    "SDEDIT_STRENGTHS",
    "MimicrySettings",
    "Mimicry",
    "Variant",
    "add_noise",
    "centered_ellipse_mask",
    "ddim_step",
    "ddim_timesteps",
    "decode",
    "fit_image",
    "generate",
    "img2img",
    "inpaint",
    "lora_mimicry",
    "parse_scenarios",
    "pipeline_class",
    "predict_x0",
    "sdedit",
    "sdedit_latents",
    "sdedit_timesteps",
    "textual_inversion_mimicry",
]

SDEDIT_STRENGTHS = (0.01, 0.05, 0.1, 0.2, 0.3)
IMG2IMG_STRENGTHS = (0.3, 0.5, 0.7)
DDIM_STEPS = 100

StepCallback = Callable[[int, int], None]


# --- SDEdit maths ------------------------------------------------------------------------------


def add_noise(z0: Tensor, noise: Tensor, abar_t: Tensor | float) -> Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) n (the forward process in closed form)."""
    abar_t = torch.as_tensor(abar_t, dtype=z0.dtype, device=z0.device)
    return abar_t.sqrt() * z0 + (1 - abar_t).sqrt() * noise


def predict_x0(z_t: Tensor, eps: Tensor, abar_t: Tensor | float) -> Tensor:
    """x̂0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the one-step denoised estimate."""
    abar_t = torch.as_tensor(abar_t, dtype=z_t.dtype, device=z_t.device)
    return (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_step(
    z_t: Tensor, eps: Tensor, abar_t: Tensor | float, abar_prev: Tensor | float
) -> Tensor:
    """Deterministic DDIM (eta 0): z_prev = sqrt(abar_prev) x̂0 + sqrt(1 - abar_prev) eps."""
    abar_prev = torch.as_tensor(abar_prev, dtype=z_t.dtype, device=z_t.device)
    return abar_prev.sqrt() * predict_x0(z_t, eps, abar_t) + (1 - abar_prev).sqrt() * eps


def ddim_timesteps(
    num_steps: int = DDIM_STEPS,
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    spacing: str = "leading",
) -> list[int]:
    """The DDIM schedule, ascending, placed as diffusers places it for the checkpoint's
    ``timestep_spacing`` and ``steps_offset``: "leading" with offset 1 (SD 1.x/2.x, SDXL) gives
    [1, 11, ..., 991] for 100 steps; "trailing" (zero-SNR fine-tunes) [9, 19, ..., 999]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        steps_offset=steps_offset,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(num_steps)
    return sorted(int(t) for t in scheduler.timesteps)


def sdedit_timesteps(
    strength: float,
    num_steps: int = DDIM_STEPS,
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    spacing: str = "leading",
) -> list[int]:
    """The timesteps SDEdit visits, descending. The first is where the noise is added.

    ``strength`` is the fraction of the DDIM schedule that is run: 0.1 of 100 steps noises at
    t = 91 and denoises at 91, 81, ..., 1 (ten UNet calls), then steps to x̂0.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"SDEdit `strength` must be in (0, 1]; got {strength}.")
    count = sdedit_step_count(strength, num_steps)
    schedule = ddim_timesteps(num_steps, num_train_timesteps, steps_offset, spacing)
    return schedule[:count][::-1]


def sdedit_step_count(strength: float, num_steps: int = DDIM_STEPS) -> int:
    """How many DDIM steps SDEdit runs at ``strength``: strengths that round to the same count
    run the same schedule and give identical outputs."""
    return max(1, min(num_steps, round(strength * num_steps)))


def one_step_timestep(strength: float, num_train_timesteps: int = 1000) -> int:
    """Where the one-step SDEdit adds its noise and predicts x̂0: t = strength * T, as the
    paper's code places it (10, 50, 100, 200, 300 for its strengths), not on the DDIM grid
    (which would give 1 for 0.01: hardly any noise)."""
    if not 0 < strength <= 1:
        raise ValueError(f"SDEdit `strength` must be in (0, 1]; got {strength}.")
    return min(num_train_timesteps - 1, max(1, round(strength * num_train_timesteps)))


def model_timesteps(
    model: LatentDiffusion, strength: float, num_steps: int, *, multistep: bool = True
) -> list[int]:
    """The timesteps SDEdit visits on the model's own schedule: :func:`sdedit_timesteps` with
    its scheduler's spacing, or the one of :func:`one_step_timestep`."""
    if not multistep:
        return [one_step_timestep(strength, model.num_train_timesteps)]
    return sdedit_timesteps(
        strength, num_steps, model.num_train_timesteps, model.steps_offset, model.timestep_spacing
    )


@torch.no_grad()
def sdedit_latents(
    model: LatentDiffusion,
    z0: Tensor,
    noise: Tensor,
    cond: Tensor | Conditioning,
    timesteps: Sequence[int],
    *,
    multistep: bool = True,
    callback: StepCallback | None = None,
) -> Tensor:
    """Noise ``z0`` at ``timesteps[0]`` and denoise from that same timestep.

    One-step: return x̂0 predicted at ``timesteps[0]``. Multi-step: DDIM through every timestep;
    the last step goes to abar = 1, i.e. returns x̂0 of the last timestep. ``cond`` is what
    ``model.predict_noise`` takes: a :class:`Conditioning` (SDXL needs one) or a bare embedding.
    """
    abar = model.alphas_cumprod
    z = add_noise(z0, noise, abar[timesteps[0]])
    visited = timesteps if multistep else timesteps[:1]
    for i, t in enumerate(visited):
        t_batch = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        eps = model.predict_noise(z, t_batch, cond)
        abar_prev = abar[visited[i + 1]] if i + 1 < len(visited) else 1.0
        z = ddim_step(z, eps, abar[t], abar_prev)
        if callback is not None:
            callback(i + 1, len(visited))
    return z


def decode(model: LatentDiffusion, latents: Tensor) -> Tensor:
    """D(z / scaling_factor), mapped from [-1, 1] to [0, 1] and clamped. An adapter with a
    ``decode`` of its own (TAEF2's) decodes its latents itself."""
    if callable(getattr(model, "decode", None)):
        with torch.no_grad():
            return ((model.decode(latents).float() + 1) / 2).clamp(0, 1)
    _require_decoder(model)
    with torch.no_grad():
        x = model.vae.decode((latents / model.scaling_factor).to(model.vae_dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def _require_decoder(model: LatentDiffusion) -> None:
    if getattr(getattr(model, "vae", None), "decoder", None) is None:
        raise ValueError("Mimicry needs the VAE decoder: load the model with with_decoder=True.")


def per_image_noise(shape: Sequence[int], batch: int, seed: int, device) -> Tensor:
    """N(0, 1) of ``shape`` for each of ``batch`` images, each drawn from its own generator
    seeded with ``seed``, so an image's draw does not depend on the batch it is in."""
    draws = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
        for _ in range(batch)
    ]
    return torch.stack(draws).to(device)


def sdedit(
    model: LatentDiffusion,
    images: Tensor,
    strength: float,
    *,
    multistep: bool = True,
    num_steps: int = DDIM_STEPS,
    prompt: str = "a photo",
    seed: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """SDEdit as in the paper: no guidance, conditioned on ``prompt`` (the reference code
    conditions on its attack prompt, "a photo" by default), E(x) the posterior mean. The
    one-step variant predicts x̂0 at :func:`one_step_timestep`.

    Every family works: the conditioning comes from ``model.condition`` at the images' pixel
    size, so SDXL also gets its pooled embedding and the time ids of an uncropped image.
    Runs in deterministic mode, wherever it is called from (``purify sdedit``, the web app's
    "Check protection", :class:`Mimicry`), so a seed repeats its bytes on CUDA too.
    """
    _require_decoder(model)
    x = images.to(model.device, torch.float32) * 2 - 1
    with deterministic_algorithms(device=model.device), torch.no_grad():
        z0 = model.encode(x)
        noise = per_image_noise(z0.shape[1:], z0.shape[0], seed, z0.device)
        cond = model.condition(prompt, z0.shape[0], images.shape[-2], images.shape[-1])
        steps = model_timesteps(model, strength, num_steps, multistep=multistep)
        z = sdedit_latents(model, z0, noise, cond, steps, multistep=multistep, callback=callback)
        return decode(model, z).cpu()


# --- diffusers pipelines -----------------------------------------------------------------------


def betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """beta_t = 1 - abar_t / abar_{t-1}: rebuild a scheduler from the schedule the model carries."""
    abar = alphas_cumprod.detach().cpu().double()  # float64 on the CPU: MPS has none
    previous = torch.cat([abar.new_ones(1), abar[:-1]])
    return (1 - abar / previous).float()


def ddim_scheduler(model: LatentDiffusion):
    """A DDIM scheduler with exactly the model's noise schedule, ``prediction_type``,
    ``timestep_spacing`` and ``steps_offset``: the steps land where the checkpoint's own
    scheduler puts them ("leading", offset 1, for SD 1.x/2.x and SDXL)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=model.num_train_timesteps,
        trained_betas=betas_from_alphas_cumprod(model.alphas_cumprod).numpy(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=model.steps_offset,
        prediction_type=model.prediction_type,
        timestep_spacing=model.timestep_spacing,
    )


# (SD 1.x/2.x class, SDXL class) of each diffusers pipeline the scenarios run
PIPELINES = {
    "text2img": ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    "img2img": ("StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "inpaint": ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"),
}


def pipeline_class(kind: str, model: LatentDiffusion):
    """The diffusers pipeline class of ``kind`` (text2img, img2img, inpaint) for the family."""
    import diffusers

    return getattr(diffusers, PIPELINES[kind][model.is_xl])


def pipeline_dtype_problem(model: LatentDiffusion) -> str | None:
    """Why diffusers' SD 1.x/2.x pipelines cannot run this model, or None.

    They need one dtype for the VAE and the UNet and do not upcast; with fp16 and a VAE whose
    config says ``force_upcast`` (the SD VAE overflows in fp16) the model holds them apart.
    SDXL's pipelines upcast by themselves (:func:`build_pipeline` handles it).
    """
    if model.is_xl or model.vae_dtype == model.dtype:
        return None
    return (
        f"The diffusers pipelines need one dtype for the VAE and the UNet; {model.name or 'this'} "
        f"runs the VAE in {model.vae_dtype} and the UNet in {model.dtype}. Use --dtype fp32 "
        "(or bf16 where the device has it natively: NVIDIA Ampere or newer, Apple silicon on "
        "macOS 14 or newer)."
    )


def build_pipeline(
    cls,
    model: LatentDiffusion,
    *,
    unet=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
):
    """A diffusers pipeline over the already-loaded modules (no safety checker, no reload).

    SDXL gets its own pipelines, with both text encoders and tokenizers and no watermark. Any
    module given replaces the model's own (textual inversion passes its trained copies). Run
    the pipeline inside :func:`_pipeline_run`, which leaves the model's VAE as it was.
    """
    _require_decoder(model)
    if model.is_xl != cls.__name__.startswith("StableDiffusionXL"):
        family = "an SDXL" if model.is_xl else "an SD 1.x/2.x"
        raise ValueError(f"{cls.__name__} does not fit {family} model; use pipeline_class().")
    vae = model.vae
    if (problem := pipeline_dtype_problem(model)) is not None:
        raise ValueError(problem)
    if model.vae_dtype != model.dtype:
        # fp16 with force_upcast, so the model holds its VAE in fp32. diffusers' SDXL pipelines
        # expect the VAE in the UNet's dtype: they cast it to fp32 to encode and decode, and
        # back to fp16 after. Done to the model's VAE, that would round its weights to fp16 for
        # good (and text-to-image would fail on the dtype mismatch), so the pipeline gets an
        # fp16 copy, the VAE diffusers itself would load (SDXL's: 0.17 GB).
        with _quiet_vae_casts():
            vae = copy.deepcopy(model.vae).to(model.dtype)
    text_encoder = text_encoder if text_encoder is not None else model.text_encoder
    if text_encoder_2 is None:
        text_encoder_2 = model.text_encoder_2
    if text_encoder is None or (model.is_xl and text_encoder_2 is None):
        raise ValueError("The text encoder was released; the pipelines need it.")
    common = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer if tokenizer is not None else model.tokenizer,
        "unet": unet if unet is not None else model.unet,
        "scheduler": ddim_scheduler(model),
        "feature_extractor": None,
    }
    if model.is_xl:
        extra = {
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2 if tokenizer_2 is not None else model.tokenizer_2,
            "image_encoder": None,
            "add_watermarker": False,
        }
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls(**common, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditioning_arguments(model: LatentDiffusion, prompt: str, height: int, width: int) -> dict:
    """The prompt, embedded here, as a pipeline takes it; the one place the mimicry's pipelines
    get it. Not diffusers' ``prompt``/``clip_skip``: diffusers 0.42 encodes the negative prompt
    of classifier-free guidance at the last layer whatever the clip skip.

    Both halves of the guidance batch come from ``model.condition``, as protection and SDEdit
    condition: the prompt and, for SD 1.x/2.x, the empty negative prompt, both at the model's
    clip skip, as A1111 and ComfyUI encode them. SDXL's negative is zeros, what diffusers' SDXL
    pipelines make of an empty negative prompt (``force_zeros_for_empty_prompt``), and SDXL also
    gets the micro-conditioning of an uncropped ``height`` x ``width`` image, SDEdit's time ids.
    """
    cond = model.condition(prompt, 1, height, width)
    if not model.is_xl:
        negative = model.condition("", 1, height, width)
        return {
            "prompt_embeds": cond.hidden_states,
            "negative_prompt_embeds": negative.hidden_states,
        }
    ids = [int(v) for v in cond.time_ids[0].tolist()]
    return {
        "prompt_embeds": cond.hidden_states,
        "pooled_prompt_embeds": cond.pooled,
        "negative_prompt_embeds": torch.zeros_like(cond.hidden_states),
        "negative_pooled_prompt_embeds": torch.zeros_like(cond.pooled),
        "original_size": tuple(ids[0:2]),
        "crops_coords_top_left": tuple(ids[2:4]),
        "target_size": tuple(ids[4:6]),
    }


def _with_text_encoders(model: LatentDiffusion, **modules) -> LatentDiffusion:
    """The model with the text encoders and tokenizers given (those not None) in place of its
    own, and a prompt cache of its own: textual inversion's trained copies then embed the
    prompt with its new token as ``model.embed_prompt`` does, at the model's clip skip."""
    given = {name: module for name, module in modules.items() if module is not None}
    return replace(model, **given, _prompt_cache={}) if given else model


class _DropVaeCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextmanager
def _quiet_vae_casts():
    """Drop the notices diffusers gives on every VAE dtype cast, which SDXL pipelines make
    (upcasting for ``force_upcast``) on every call: they are by design, not a problem."""
    notices = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _DropVaeCastNotice()
    notices.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*upcast_vae", category=FutureWarning)
            yield
    finally:
        notices.removeFilter(quiet)


@contextmanager
def _pipeline_run(model: LatentDiffusion, pipe):
    """Run ``pipe`` quietly and leave the model's VAE in the dtype the model holds it in.

    With ``force_upcast`` (SDXL's VAE config, and the default), an SDXL pipeline casts the VAE
    it was given to fp32 to encode and back to the UNet's dtype: lossless for a bf16 or fp32
    VAE, but after an error midway the VAE would stay fp32. It is put back here.
    """
    with _quiet_vae_casts():
        try:
            yield
        finally:
            if model.vae.dtype != model.vae_dtype:
                model.vae.to(model.vae_dtype)


def _step_end(callback: StepCallback | None, total: int):
    """Adapt ``callback(step, total)`` to diffusers' ``callback_on_step_end`` signature."""
    if callback is None:
        return None

    def on_step_end(pipe, step: int, timestep, kwargs: dict) -> dict:
        callback(step + 1, total)
        return kwargs

    return on_step_end


def img2img(
    model: LatentDiffusion,
    images: Tensor,
    strength: float = 0.5,
    *,
    prompt: str = "a photo",
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """img2img as attackers run it, one image at a time: ``StableDiffusionImg2ImgPipeline``,
    or ``StableDiffusionXLImg2ImgPipeline`` for SDXL (time ids of the uncropped image)."""
    pipe = build_pipeline(pipeline_class("img2img", model), model)
    total = max(1, int(num_inference_steps * strength))
    conditioning = _conditioning_arguments(model, prompt, images.shape[-2], images.shape[-1])
    outputs = []
    with _pipeline_run(model, pipe):
        for image in images:
            result = pipe(
                image=image[None].to(model.device, torch.float32),  # the pipeline casts
                strength=strength,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
                callback_on_step_end=_step_end(callback, total),
                **conditioning,
            )
            outputs.append(result.images[0].float().cpu())
    return torch.stack(outputs)


def centered_ellipse_mask(height: int, width: int, keep: float = 0.6) -> Tensor:
    """(1, H, W) mask, 1 = regenerate: everything outside a centred ellipse spanning ``keep``.

    A deliberately simple stand-in for subject detection: most portraits and artworks put the
    subject in the middle, and the ellipse keeps ``keep`` of each dimension around the centre.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"`keep` must be in (0, 1]; got {keep}.")
    ys = (torch.arange(height) + 0.5 - height / 2) / (keep * height / 2)
    xs = (torch.arange(width) + 0.5 - width / 2) / (keep * width / 2)
    inside = ys[:, None] ** 2 + xs[None, :] ** 2 <= 1
    return (~inside).float()[None]


def inpaint(
    model: LatentDiffusion,
    images: Tensor,
    masks: Tensor | None = None,
    *,
    prompt: str = "a photo",
    keep: float = 0.6,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Regenerate the masked region (mask 1 = regenerate) with ``StableDiffusionInpaintPipeline``
    (``StableDiffusionXLInpaintPipeline`` for SDXL).

    ``model`` may be an inpainting checkpoint (a 9-channel UNet) or a plain one, which diffusers
    handles by blending the known region back in at every step. ``masks``: (N, 1, H, W) in
    [0, 1]; None uses :func:`centered_ellipse_mask`.
    """
    pipe = build_pipeline(pipeline_class("inpaint", model), model)
    _, _, height, width = images.shape
    conditioning = _conditioning_arguments(model, prompt, height, width)
    outputs = []
    with _pipeline_run(model, pipe):
        for i, image in enumerate(images):
            mask = centered_ellipse_mask(height, width, keep) if masks is None else masks[i]
            result = pipe(
                image=image[None].to(model.device, torch.float32),  # the pipeline casts
                mask_image=mask[None].to(model.device, torch.float32),
                height=height,
                width=width,
                strength=1.0,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
                callback_on_step_end=_step_end(callback, num_inference_steps),
                **conditioning,
            )
            outputs.append(result.images[0].float().cpu())
    return torch.stack(outputs)


def generate(
    model: LatentDiffusion,
    prompt: str,
    num_images: int,
    height: int,
    width: int,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int = 0,
    unet=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Text-to-image samples; sample i uses seed ``seed + i`` whatever the concept learned.

    The modules given replace the model's own (``text_encoder_2``/``tokenizer_2``: SDXL only),
    in the pipeline and in embedding the prompt: textual inversion's trained copies know its
    new token.
    """
    pipe = build_pipeline(
        pipeline_class("text2img", model),
        model,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    prompted = _with_text_encoders(
        model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    conditioning = _conditioning_arguments(prompted, prompt, height, width)
    outputs = []
    with _pipeline_run(model, pipe):
        for i in range(num_images):
            result = pipe(
                height=height,
                width=width,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="pt",
                callback_on_step_end=_step_end(callback, num_inference_steps),
                **conditioning,
            )
            outputs.append(result.images[0].float().cpu())
    return torch.stack(outputs)


# --- learning a concept: textual inversion and DreamBooth-LoRA ---------------------------------


def _denoising_loss(
    model: LatentDiffusion, images: Tensor, cond: Tensor | Conditioning, generator: torch.Generator
) -> Tensor:
    """The model's own training loss: || eps_theta(z_t, t, c) - n ||^2, t uniform, z from E(x);
    for a v-prediction model the target is v instead of n (as it was trained).

    ``cond`` is a bare embedding, or a :class:`Conditioning` (SDXL's carries its pooled
    embedding and time ids).
    """
    device = model.device
    x = images.to(device, torch.float32) * 2 - 1
    batch = x.shape[0]
    latent_shape = (batch, *model.latent_shape(x.shape[2], x.shape[3]))
    posterior = torch.randn(latent_shape, generator=generator).to(device)
    with torch.no_grad():
        z0 = model.encode(x, posterior_noise=posterior)
    t = torch.randint(0, model.num_train_timesteps, (batch,), generator=generator).to(device)
    noise = torch.randn(latent_shape, generator=generator).to(device)
    z_t = add_noise(z0, noise, model.alphas_cumprod[t].view(-1, 1, 1, 1))
    if not isinstance(cond, Conditioning):
        cond = Conditioning(cond)
    prediction = model.unet(
        z_t.to(model.dtype),
        t,
        encoder_hidden_states=cond.hidden_states.to(model.dtype),
        added_cond_kwargs=cond.added_cond_kwargs(model.dtype),
    ).sample
    target = noise
    if model.prediction_type == "v_prediction":
        target = v_target(z0, noise, t, model.alphas_cumprod)
    return F.mse_loss(prediction.float(), target)


def _scaled_backward(loss: Tensor, params: Sequence[Tensor], scale: float) -> bool:
    """``loss.backward()`` with a static loss scale, the gradients divided back.

    An fp16 UNet's backward loses the denoising loss's small gradients to underflow (see
    :data:`mimicshield.methods.FP16_LOSS_SCALE`); scaled, they stay representable. Returns
    False, with the gradients cleared, if scaling overflowed: the optimiser skips that step, as
    mixed-precision training's gradient scaler does.
    """
    if scale == 1.0:  # fp32/bf16: a plain backward, no check (it would sync a GPU every step)
        loss.backward()
        return True
    (loss * scale).backward()
    grads = [p.grad for p in params if p.grad is not None]
    for grad in grads:
        grad.div_(scale)
    if not grads or bool(torch.stack([grad.isfinite().all() for grad in grads]).all()):
        return True  # one host sync for all the gradients, not one per LoRA matrix
    for p in params:
        p.grad = None
    return False


def _warn_skipped(scenario: str, skipped: int, steps: int) -> None:
    """Say how many steps an fp16 overflow skipped: they silently shorten the training."""
    if skipped:
        warnings.warn(
            f"{scenario}: {skipped} of {steps} training steps were skipped because the fp16 "
            "gradients overflowed; the concept is learned from fewer steps (--dtype bf16 or "
            "fp32 avoids it).",
            stacklevel=3,
        )


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    """Image indices for each step: shuffled epochs, so every image is seen equally often."""
    if count < 1:
        raise ValueError("Training needs at least one image.")
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:  # more than one epoch when the batch exceeds the set
            order += torch.randperm(count, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


@dataclass(frozen=True)
class TrainingSchedule:
    """A short fine-tuning schedule; defaults are the usual community settings, scaled down."""

    steps: int = 300
    learning_rate: float = 5e-3
    batch_size: int = 1
    seed: int = 0


@dataclass(eq=False)
class _Placeholder:
    """A copy of one tokenizer and text encoder that learn one new token's embedding row."""

    tokenizer: object
    text_encoder: torch.nn.Module
    token_id: int
    original: Tensor  # the whole input embedding table as initialised
    frozen: Tensor  # True for every row but the new token's

    @classmethod
    def add(cls, tokenizer, text_encoder, token: str, initializer: str) -> _Placeholder:
        """Copy both, add ``token``, start its row at the mean of ``initializer``'s rows."""
        tokenizer = copy.deepcopy(tokenizer)
        text_encoder = copy.deepcopy(text_encoder).float()
        if tokenizer.add_tokens([token]) != 1:
            raise ValueError(f"The token {token!r} is already in the vocabulary; choose another.")
        token_id = tokenizer.convert_tokens_to_ids(token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
        with torch.no_grad():
            weight[token_id] = weight[init_ids].mean(dim=0)
        original = weight.detach().clone()
        frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        frozen[token_id] = False
        return cls(tokenizer, text_encoder, token_id, original, frozen)

    @property
    def weight(self) -> Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def restore_other_rows(self) -> None:
        """Only the new token's row learns: every other row goes back to its value."""
        with torch.no_grad():
            self.weight[self.frozen] = self.original[self.frozen]

    def learned(self) -> Tensor:
        return self.weight[self.token_id].detach().clone()


def _ti_conditioning(
    model: LatentDiffusion, placeholders: list[_Placeholder], ids: list[Tensor], size
) -> Tensor | Conditioning:
    """c of the prompt from the encoder copies being trained, with gradients.

    Built as ``model.embed_prompt`` and ``model.condition`` build it, at the model's clip skip
    (:func:`~mimicshield.models.encode_prompt_ids`). SD 1.x/2.x: the bare embedding. SDXL: both
    encoders' hidden states concatenated, the pooled embedding from the second's projection,
    the time ids of an uncropped image of ``size`` (height, width).
    """
    encoded = [
        encode_prompt_ids(p.text_encoder, i, model.clip_skip, xl=model.is_xl)
        for p, i in zip(placeholders, ids, strict=True)
    ]
    if not model.is_xl:
        return encoded[0][0]
    (first, _), (second, output) = encoded
    hidden = torch.cat([first, second], dim=-1)
    pooled = output[0]  # CLIPTextModelWithProjection's text_embeds
    return Conditioning(hidden, pooled, sdxl_time_ids(*size).to(model.device))


TI_TOKEN = "<mimicshield>"
# Textual inversion as attackers train it (diffusers' example, for a style): each step phrases
# the token in a randomly chosen prompt and flips the image half the time, so the embedding
# learns the style rather than one sentence or one orientation.
TI_TRAINING_TEMPLATES = (
    "an image in the style of {}",
    "a painting in the style of {}",
    "a picture in the style of {}",
    "artwork in the style of {}",
    "a rendering in the style of {}",
    "a close-up image in the style of {}",
    "a cropped picture in the style of {}",
    "a small painting in the style of {}",
    "a large picture in the style of {}",
    "a nice image in the style of {}",
)
TI_FLIP_PROBABILITY = 0.5


def textual_inversion_mimicry(
    model: LatentDiffusion,
    images: Tensor,
    schedule: TrainingSchedule = TrainingSchedule(),
    *,
    token: str = TI_TOKEN,
    initializer: str = "art",
    template: str = "an image in the style of {}",
    training_templates: Sequence[str] = TI_TRAINING_TEMPLATES,
    flip_probability: float = TI_FLIP_PROBABILITY,
    num_samples: int = 4,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    callback: StepCallback | None = None,
    sample_callback: StepCallback | None = None,
) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
    """Learn one token embedding on ``images``, then generate ``num_samples`` images with it.

    Works on copies of the tokenizer and text encoder, so the loaded model is left as it was.
    Each step phrases the token in one of ``training_templates`` and flips the image
    horizontally with ``flip_probability``, as attackers train it; the samples use ``template``.
    Returns the samples and the learned embedding: for SD 1.x/2.x one tensor of shape (hidden,).

    SDXL learns the token in both text encoders at once (the same token added to both
    tokenizers, one new row in each embedding table), trained on the conditioning
    ``model.condition`` would build at the images' size, and samples with diffusers' SDXL
    text-to-image pipeline over both trained copies. Its learned embedding is a dict, in the
    key names of SDXL embedding files: ``{"clip_l": (hidden,), "clip_g": (hidden_2,)}``, the
    first (``text_encoder``) and second (``text_encoder_2``) encoder's row.
    """
    if (problem := pipeline_dtype_problem(model)) is not None:  # before, not after, training
        raise ValueError(f"textual inversion: {problem}")
    if model.text_encoder is None or model.tokenizer is None:
        raise ValueError("Textual inversion needs the text encoder and tokenizer.")
    if model.is_xl and (model.text_encoder_2 is None or model.tokenizer_2 is None):
        raise ValueError("SDXL textual inversion needs both text encoders and tokenizers.")
    pairs = [(model.tokenizer, model.text_encoder)]
    if model.is_xl:
        pairs.append((model.tokenizer_2, model.text_encoder_2))
    placeholders = [_Placeholder.add(t, e, token, initializer) for t, e in pairs]

    prompt = template.format(token)  # what the samples are generated with
    phrasings = [t.format(token) for t in (training_templates or [template])]
    learned = _train_placeholders(
        model, placeholders, phrasings, images, schedule, flip_probability, callback
    )

    for placeholder in placeholders:
        placeholder.text_encoder.to(model.dtype)
    second = {}
    if model.is_xl:
        second = {
            "text_encoder_2": placeholders[1].text_encoder,
            "tokenizer_2": placeholders[1].tokenizer,
        }
    samples = generate(
        model,
        prompt,
        num_samples,
        images.shape[2],
        images.shape[3],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=schedule.seed,
        text_encoder=placeholders[0].text_encoder,
        tokenizer=placeholders[0].tokenizer,
        callback=sample_callback,
        **second,
    )
    if model.is_xl:
        return samples, {"clip_l": learned[0], "clip_g": learned[1]}
    return samples, learned[0]


def _train_placeholders(
    model: LatentDiffusion,
    placeholders: list[_Placeholder],
    phrasings: Sequence[str],
    images: Tensor,
    schedule: TrainingSchedule,
    flip_probability: float,
    callback: StepCallback | None,
) -> list[Tensor]:
    """Textual inversion's training loop: each step one phrasing, some images mirrored, the
    denoising loss, and only the placeholder's rows updated. Returns each encoder's new row."""
    ids = [[model._tokens(p.tokenizer, text) for p in placeholders] for text in phrasings]
    weights = [p.weight for p in placeholders]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=schedule.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(schedule.seed)
    augment = torch.Generator().manual_seed(schedule.seed + 1)  # prompts and flips: own stream
    size = (images.shape[2], images.shape[3])
    skipped = 0
    batches = _batches(len(images), schedule.batch_size, schedule.steps, generator)
    for step, batch in enumerate(batches):
        phrasing = int(torch.randint(len(ids), (), generator=augment))
        cond = _ti_conditioning(model, placeholders, ids[phrasing], size)
        if isinstance(cond, Conditioning):
            cond = cond.expand(len(batch))
        else:
            cond = cond.expand(len(batch), -1, -1)
        flips = torch.rand(len(batch), generator=augment) < flip_probability
        chosen = images[batch]
        chosen = torch.where(flips.view(-1, 1, 1, 1).to(chosen.device), chosen.flip(-1), chosen)
        loss = _denoising_loss(model, chosen, cond, generator)
        if _scaled_backward(loss, weights, loss_scale(model)):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        for placeholder in placeholders:  # only the new token's rows learn
            placeholder.restore_other_rows()
        if callback is not None:
            callback(step + 1, schedule.steps)
    _warn_skipped("textual inversion", skipped, schedule.steps)
    for weight in weights:
        weight.requires_grad_(False)
    return [p.learned().float().cpu() for p in placeholders]


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _add_seeded_adapter(unet, config, name: str, seed: int) -> None:
    """Add the LoRA adapter with weights drawn from ``seed``, not the global RNG.

    peft initialises the adapter from torch's global generator, which nothing seeds: the same
    seed would train from different starting weights. A forked RNG keeps the caller's state.
    Only the CPU generator is seeded (``torch.manual_seed`` would reseed the GPUs' too, which
    the fork does not restore): peft draws the weights on the CPU, then moves them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        unet.add_adapter(config, adapter_name=name)


def lora_mimicry(
    model: LatentDiffusion,
    images: Tensor,
    schedule: TrainingSchedule = TrainingSchedule(steps=200, learning_rate=1e-4),
    *,
    rank: int = 4,
    prompt: str = "an image in the style of sks",
    num_samples: int = 4,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    callback: StepCallback | None = None,
    sample_callback: StepCallback | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DreamBooth-LoRA (no prior preservation) on ``images``, then ``num_samples`` samples.

    Trained and sampled at the images' size (for SDXL: the time ids of an uncropped image of
    that size, and its own text-to-image pipeline). The adapter is added to the loaded UNet for
    the run and unloaded afterwards, so the model is unchanged. Returns the samples and the
    adapter's weights (peft state-dict names).
    """
    try:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
    except ImportError as error:
        raise ImportError(
            "LoRA mimicry needs peft: pip install 'peft>=0.13' (or '.[evaluate]' in a checkout)."
        ) from error

    if (problem := pipeline_dtype_problem(model)) is not None:  # before, not after, training
        raise ValueError(f"lora: {problem}")
    unet = model.unet
    name = "mimicshield_lora"
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )
    _add_seeded_adapter(unet, config, name, schedule.seed)
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # train the adapter in fp32 even when the UNet runs in half precision
            p.data = p.data.float()
        # c at the images' size: SDXL's time ids say uncropped, as when sampling below
        cond = model.condition(prompt, 1, images.shape[2], images.shape[3])
        optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=1e-2)
        generator = torch.Generator().manual_seed(schedule.seed)
        batches = _batches(len(images), schedule.batch_size, schedule.steps, generator)
        skipped = 0
        for step, batch in enumerate(batches):
            loss = _denoising_loss(model, images[batch], cond.expand(len(batch)), generator)
            if _scaled_backward(loss, params, loss_scale(model)):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if callback is not None:
                callback(step + 1, schedule.steps)
        _warn_skipped("LoRA", skipped, schedule.steps)
        for p in params:
            p.requires_grad_(False)
        weights = {
            k: v.detach().cpu().clone()
            for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()
        }
        samples = generate(
            model,
            prompt,
            num_samples,
            images.shape[2],
            images.shape[3],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            seed=schedule.seed,
            callback=sample_callback,
        )
    finally:
        unet.unload_lora()  # removes the peft wrappers too: the UNet is the module it was
    return samples, weights


# --- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    paired: bool  # one output per input image (else: a set of samples from a learned concept)
    description: str


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("sdedit-onestep", True, "SDEdit, one-step x̂0 prediction, no guidance"),
        Scenario("sdedit-ddim", True, "SDEdit, 100-step DDIM schedule, eta 0, no guidance"),
        Scenario("img2img", True, "diffusers img2img pipeline, guidance 7.5, a prompt"),
        Scenario("inpaint", True, "diffusers inpainting pipeline, given or centred-ellipse mask"),
        Scenario("textual-inversion", False, "learn a token on the set, then generate"),
        Scenario("lora", False, "DreamBooth-LoRA (peft) on the set, then generate"),
    )
}
PIPELINE_SCENARIOS = ("img2img", "inpaint", "textual-inversion", "lora")
SCENARIO_ALIASES = {
    "sdedit": ("sdedit-onestep", "sdedit-ddim"),
    "ti": ("textual-inversion",),
    "all": tuple(SCENARIOS),
}


def parse_scenarios(names: Sequence[str]) -> list[str]:
    """Expand comma-separated names and aliases (``sdedit``, ``ti``, ``all``), keeping order."""
    chosen: list[str] = []
    for part in (p.strip() for name in names for p in name.split(",")):
        if not part:
            continue
        expanded = SCENARIO_ALIASES.get(part, (part,))
        for scenario in expanded:
            if scenario not in SCENARIOS:
                known = ", ".join([*SCENARIOS, *SCENARIO_ALIASES])
                raise ValueError(f"Unknown scenario {part!r}; choose from: {known}.")
            if scenario not in chosen:
                chosen.append(scenario)
    if not chosen:
        raise ValueError("No scenario chosen.")
    return chosen


@dataclass(frozen=True)
class Variant:
    """One scenario at one strength: the unit that gets its own outputs and metrics."""

    scenario: str
    strength: float | None = None

    @property
    def paired(self) -> bool:
        return SCENARIOS[self.scenario].paired

    @property
    def key(self) -> str:
        return self.scenario if self.strength is None else f"{self.scenario}@{self.strength:g}"

    @property
    def label(self) -> str:
        return self.scenario if self.strength is None else f"{self.scenario} s={self.strength:g}"


@dataclass
class MimicrySettings:
    """Every knob of the simulations, with the paper's defaults; serialised into the results."""

    prompt: str = "a photo"
    seed: int = 0
    resolution: int | None = None  # None: the model's own size; 0: each image's native size
    sdedit_strengths: tuple[float, ...] = SDEDIT_STRENGTHS
    sdedit_steps: int = DDIM_STEPS
    img2img_strengths: tuple[float, ...] = IMG2IMG_STRENGTHS
    guidance_scale: float = 7.5
    sample_steps: int = 50
    inpaint_keep: float = 0.6
    mask: Path | None = None
    num_samples: int = 4
    ti_steps: int = 300
    ti_learning_rate: float = 5e-3
    lora_steps: int = 200
    lora_learning_rate: float = 1e-4
    lora_rank: int = 4
    scenarios: list[str] = field(default_factory=lambda: ["sdedit-onestep", "sdedit-ddim"])

    def __post_init__(self) -> None:
        """Names checked and aliases expanded as ``--scenarios`` does, so that ``sdedit`` or a
        typo is one line now, not a KeyError deep inside evaluate or mimic; a plain string is
        one name or a comma-separated list, not its letters."""
        names = [self.scenarios] if isinstance(self.scenarios, str) else list(self.scenarios)
        self.scenarios = parse_scenarios(names)
        if "sdedit-ddim" in self.scenarios:
            _warn_collapsed_strengths(self.sdedit_strengths, self.sdedit_steps)

    def variants(self) -> list[Variant]:
        strengths = {
            "sdedit-onestep": self.sdedit_strengths,
            "sdedit-ddim": self.sdedit_strengths,
            "img2img": self.img2img_strengths,
        }
        return [Variant(name, s) for name in self.scenarios for s in strengths.get(name, (None,))]

    def to_dict(self) -> dict:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values["mask"] = str(self.mask) if self.mask else None
        return values


def _warn_collapsed_strengths(strengths: Sequence[float], num_steps: int) -> None:
    """Warn when SDEdit-DDIM strengths round to the same number of steps: their outputs and
    numbers would be identical under different labels. A warning, not a refusal: the run is
    still correct, only redundant; the fix is more steps."""
    try:
        distinct = sorted({float(s) for s in strengths})
        counts: dict[int, list[float]] = {}
        for strength in distinct:
            counts.setdefault(sdedit_step_count(strength, num_steps), []).append(strength)
    except (TypeError, ValueError):
        return  # not numbers: sdedit_timesteps says so when it runs
    same = [group for group in counts.values() if len(group) > 1]
    if not same:
        return
    enough = next(
        (
            n
            for n in range(num_steps + 1, 100_001)
            if len({sdedit_step_count(s, n) for s in distinct}) == len(distinct)
        ),
        None,
    )
    groups = "; ".join(
        f"{', '.join(f'{s:g}' for s in group)} all run "
        f"{sdedit_step_count(group[0], num_steps)} of {num_steps}"
        for group in same
    )
    hint = f" (at least {enough})" if enough else ""
    warnings.warn(
        f"SDEdit strengths that run the same DDIM steps give identical outputs: {groups}; "
        f"use more --sdedit-steps{hint} to tell them apart.",
        stacklevel=4,  # the caller of MimicrySettings(), past __post_init__ and __init__
    )


def model_resolution(model: LatentDiffusion) -> int:
    """The square size a mimic feeds this model: its own training size (512 when unknown)."""
    return model.native_size or 512


def size_problem(width: int, height: int, resolution: int | None, multiple: int = 8) -> str | None:
    """Why an image of ``width`` x ``height`` cannot be mimicked at ``resolution``, or None.

    Only resolution 0 keeps an image's own size, cropped to a multiple of ``multiple`` (the
    VAE's downsampling): a side below that crops to nothing. Asked per file before the model
    loads, so such an image is left out with its name, not found after the load.
    """
    if resolution != 0 or (width >= multiple and height >= multiple):  # None: the model's size
        return None
    return (
        f"{width}x{height} is smaller than {multiple} pixels a side, the least --resolution 0 "
        f"can keep (it crops each image's own size to a multiple of {multiple}); use "
        "--resolution N to resize it"
    )


def fit_image(image: Tensor, resolution: int, multiple: int = 8) -> Tensor:
    """(3, H, W) -> the square ``resolution`` crop an attacker would use (shorter side resized).

    ``resolution`` 0 keeps the native size, centre-cropped to a multiple of ``multiple``.
    """
    _, height, width = image.shape
    if resolution:
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
        if size != (height, width):
            image = F.interpolate(
                image[None], size=size, mode="bicubic", antialias=True, align_corners=False
            )[0].clamp(0, 1)
        crop_h = crop_w = resolution
    else:
        if (problem := size_problem(width, height, resolution, multiple)) is not None:
            raise ValueError(f"An image of {problem}.")
        crop_h, crop_w = height // multiple * multiple, width // multiple * multiple
    top = (image.shape[1] - crop_h) // 2
    left = (image.shape[2] - crop_w) // 2
    return image[:, top : top + crop_h, left : left + crop_w].contiguous()


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow converts RGB to grey


def find_mask(folder: Path, name: str) -> Path | None:
    """The mask for image ``name`` (its path below its folder, without suffix) in ``folder``:
    the same relative path, else a file of the same stem with any suffix; None if there is none.
    """
    relative = Path(name)
    candidates = [folder / relative, *sorted(folder.glob(f"{glob_escape(relative.stem)}.*"))]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def load_mask(path: Path, height: int, width: int, resolution: int = 0) -> Tensor:
    """A mask image as (1, H, W) in {0, 1}, 1 = regenerate (white).

    The mask is drawn on the user's image, so it is resized and centre-cropped as
    :func:`fit_image` fits the image (``resolution``), not squashed to the crop's shape; a mask
    of another size is then resized to (H, W) with nearest neighbours.
    """
    from .images import load_image

    # the package's loader: any file it reads is a mask (upright, as the image is), and a bad
    # one is an ImageFileError naming it, not Pillow's bare message
    rgb = load_image(path).rgb
    gray = (rgb * torch.tensor(LUMA).view(3, 1, 1)).sum(0)  # Pillow's convert("L") weights
    mask = fit_image(gray[None], resolution)
    if tuple(mask.shape[1:]) != (height, width):
        mask = F.interpolate(mask[None], size=(height, width), mode="nearest")[0]
    return (mask > 0.5).float()


class Mimicry:
    """Runs the chosen scenarios with fixed settings: one call per image (or image set).

    ``inpaint_model`` is an inpainting checkpoint for the ``inpaint`` scenario; without one the
    main model inpaints (diffusers blends the kept region back at each step). Like protection,
    every run is in PyTorch's deterministic mode (:mod:`mimicshield.reproducibility`), so an
    evaluation repeats to the bit on the same CUDA device too, training scenarios included.
    """

    def __init__(
        self,
        model: LatentDiffusion,
        settings: MimicrySettings | None = None,
        *,
        inpaint_model: LatentDiffusion | None = None,
    ) -> None:
        self.model = model
        settings = settings or MimicrySettings()
        if settings.resolution is None:  # what the model's own pipelines resize to
            settings = replace(settings, resolution=model_resolution(model))
        self.settings = settings
        self.inpaint_model = inpaint_model
        if "lora" in settings.scenarios and importlib.util.find_spec("peft") is None:
            raise ImportError(  # now, not after every other scenario has run
                "The lora scenario needs peft: pip install 'peft>=0.13' (or '.[evaluate]' in a "
                "checkout), or leave lora out of --scenarios."
            )
        # img2img, inpaint and the samples of textual inversion and LoRA run diffusers'
        # pipelines: refuse now, not after the training scenarios' minutes of training
        for scenario in self.settings.scenarios:
            runs = inpaint_model if scenario == "inpaint" and inpaint_model else model
            if scenario not in PIPELINE_SCENARIOS:
                continue
            if (problem := pipeline_dtype_problem(runs)) is not None:
                raise ValueError(f"{scenario}: {problem}")

    def steps(self, variant: Variant) -> int:
        """UNet calls per image (paired) or training + sampling steps (sets), for progress."""
        s = self.settings
        if variant.scenario == "sdedit-onestep":
            return 1
        if variant.scenario == "sdedit-ddim":
            return len(model_timesteps(self.model, variant.strength, s.sdedit_steps))
        if variant.scenario == "img2img":
            return max(1, int(s.sample_steps * variant.strength))
        if variant.scenario == "inpaint":
            return s.sample_steps
        train = s.ti_steps if variant.scenario == "textual-inversion" else s.lora_steps
        return train + s.num_samples * s.sample_steps

    def mask_for(self, name: str | None, height: int, width: int) -> Tensor:
        """The given mask (a file, or a folder matched by path or stem), else the ellipse."""
        mask = self.settings.mask
        if mask is None:
            return centered_ellipse_mask(height, width, self.settings.inpaint_keep)
        if mask.is_file():
            return load_mask(mask, height, width, self.settings.resolution)
        found = find_mask(mask, name) if name is not None else None
        if found is None:
            raise FileNotFoundError(f"No mask for {name} in {mask}.")
        return load_mask(found, height, width, self.settings.resolution)

    def run(
        self, variant: Variant, image: Tensor, name: str | None = None, callback=None
    ) -> Tensor:
        """Mimic one (3, H, W) image in [0, 1] with a paired scenario; returns (3, H, W)."""
        with deterministic_algorithms(device=self.model.device):
            return self._run(variant, image, name, callback)

    def _run(self, variant: Variant, image: Tensor, name: str | None, callback) -> Tensor:
        if variant.scenario not in SCENARIOS:
            known = ", ".join(SCENARIOS)
            raise ValueError(f"Unknown scenario {variant.scenario!r}; choose from: {known}.")
        if not SCENARIOS[variant.scenario].paired:
            raise ValueError(f"{variant.scenario} learns from a set of images; use run_set.")
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(
                f"run takes one (3, H, W) image in [0, 1]; got {shape}. Call it once per "
                "image of a batch."
            )
        s, batch = self.settings, image[None]
        common = {"seed": s.seed, "callback": callback}
        if variant.scenario in ("sdedit-onestep", "sdedit-ddim"):
            multistep = variant.scenario == "sdedit-ddim"
            out = sdedit(
                self.model,
                batch,
                variant.strength,
                multistep=multistep,
                num_steps=s.sdedit_steps,
                prompt=s.prompt,
                **common,
            )
        elif variant.scenario == "img2img":
            out = img2img(
                self.model,
                batch,
                variant.strength,
                prompt=s.prompt,
                guidance_scale=s.guidance_scale,
                num_inference_steps=s.sample_steps,
                **common,
            )
        elif variant.scenario == "inpaint":
            mask = self.mask_for(name, image.shape[1], image.shape[2])[None]
            out = inpaint(
                self.inpaint_model or self.model,
                batch,
                mask,
                prompt=s.prompt,
                guidance_scale=s.guidance_scale,
                num_inference_steps=s.sample_steps,
                **common,
            )
        else:  # unreachable: every paired scenario is handled above
            raise AssertionError(variant.scenario)
        return out[0]

    def run_set(
        self, variant: Variant, images: Tensor, callback=None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Learn a concept from (N, 3, H, W) images and sample; returns samples and weights.

        The weights of textual inversion are ``{"<mimicshield>": (hidden,)}`` (the token and its
        row, as diffusers' ``load_textual_inversion`` reads them), or for SDXL
        ``{"clip_l": (hidden,), "clip_g": (hidden_2,)}`` (one row per text encoder).
        """
        with deterministic_algorithms(device=self.model.device):
            return self._run_set(variant, images, callback)

    def _run_set(
        self, variant: Variant, images: Tensor, callback
    ) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.settings
        steps_done = 0
        total = self.steps(variant)

        def train_cb(step: int, _total: int) -> None:
            if callback is not None:
                callback(step, total)

        def sample_cb(_step: int, _total: int) -> None:
            nonlocal steps_done
            steps_done += 1
            if callback is not None:
                train = s.ti_steps if variant.scenario == "textual-inversion" else s.lora_steps
                callback(train + steps_done, total)

        common = {
            "num_samples": s.num_samples,
            "guidance_scale": s.guidance_scale,
            "num_inference_steps": s.sample_steps,
            "callback": train_cb,
            "sample_callback": sample_cb,
        }
        if variant.scenario == "textual-inversion":
            schedule = TrainingSchedule(s.ti_steps, s.ti_learning_rate, seed=s.seed)
            samples, learned = textual_inversion_mimicry(self.model, images, schedule, **common)
            if isinstance(learned, dict):  # SDXL: one row per text encoder, clip_l and clip_g
                return samples, learned
            return samples, {TI_TOKEN: learned}  # diffusers' format: {token: embedding}
        if variant.scenario == "lora":
            schedule = TrainingSchedule(s.lora_steps, s.lora_learning_rate, seed=s.seed)
            return lora_mimicry(self.model, images, schedule, rank=s.lora_rank, **common)
        raise ValueError(f"{variant.scenario} works image by image; use run.")


def strength_grid(values: Sequence[float]) -> tuple[float, ...]:
    """Validate a list of strengths in (0, 1], sorted and deduplicated."""
    given = [float(v) for v in values]  # once: ``values`` may be a generator
    grid = tuple(sorted(set(given)))
    if not grid or any(not (0 < v <= 1) or math.isnan(v) for v in grid):
        raise ValueError(f"Strengths must be in (0, 1]; got {given}.")
    return grid
