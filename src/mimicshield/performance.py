"""Speed and memory options for a loaded :class:`~mimicshield.models.LatentDiffusion`.

What is already on by default, elsewhere:

- frozen weights and eval mode (``load_models``), so no weight gradient is ever computed;
- bf16 on CUDA that supports it, fp16 on MPS (``resolve_dtype``), the VAE in fp32 only where
  fp16 overflows (``vae_dtype_for``);
- the text embedding and the target latent computed once per run (``Protector``);
- SDPA attention: diffusers gives every attention layer ``AttnProcessor2_0``, which calls
  ``torch.nn.functional.scaled_dot_product_attention`` (flash or memory-efficient kernels on
  CUDA). :func:`attention_processors` reports it; ``mimicshield bench`` records it.

This module adds what trades something away, so it is opt-in: :func:`enable_low_memory` (compute
for memory) and :func:`compile_model` (start-up time for step time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .models import LatentDiffusion

SDPA_PROCESSORS = ("AttnProcessor2_0",)


def attention_processors(model: LatentDiffusion) -> list[str]:
    """The attention processor classes the UNet and the VAE use, e.g. ``["AttnProcessor2_0"]``."""
    names: set[str] = set()
    for module in (model.unet, model.vae):
        processors = getattr(module, "attn_processors", None) or {}
        names.update(type(processor).__name__ for processor in processors.values())
    return sorted(names)


def uses_sdpa(model: LatentDiffusion) -> bool:
    """Whether every attention layer goes through ``scaled_dot_product_attention``."""
    names = attention_processors(model)
    return bool(names) and all(name in SDPA_PROCESSORS for name in names)


def enable_low_memory(model: LatentDiffusion, prompts: Iterable[str] = ()) -> None:
    """Trade some compute for a smaller peak: for 4 GB cards and for large batches.

    - Gradient checkpointing in the VAE encoder: only each block's input is kept for the
      backward pass, and the block is run again there. This removes most of the activation
      memory of the encoder backward, which dominates every method, for about one more encoder
      forward per step.
    - Gradient checkpointing in the UNet: only active when gradients flow through it (AdvDM,
      Mist), so the SDS methods, which run the UNet without gradients, pay nothing for it.
    - The text encoder is released once ``prompts`` are embedded (their embeddings stay cached).
    - Attention slicing only where SDPA is unavailable or on MPS: with SDPA's flash and
      memory-efficient kernels the attention matrix is never stored, and slicing would replace
      them with a slower processor that stores it slice by slice.
    """
    prompts = list(prompts)
    for prompt in prompts:
        model.embed_prompt(prompt)
    if prompts:
        model.release_text_encoder()
    model.vae.enable_gradient_checkpointing()
    if model.unet is not None:
        model.unet.enable_gradient_checkpointing()
        if model.device.type == "mps" or not uses_sdpa(model):
            model.unet.set_attention_slice("auto")
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def compile_model(
    model: LatentDiffusion,
    *,
    mode: str | None = None,
    warmup: Callable[[], object] | None = None,
) -> float:
    """``torch.compile`` the UNet and the VAE encoder in place; returns the compile seconds.

    Compilation happens on the first call with each new input shape, so the time is only known
    once something has run: pass ``warmup`` (e.g. one protection step at the real size) to pay it
    here and get it back; without it this returns 0.0 and the first step pays instead.

    Args:
        mode: a ``torch.compile`` mode: None (the default), ``"max-autotune-no-cudagraphs"``
            (longer compile, sometimes faster kernels) or ``"reduce-overhead"`` (CUDA graphs,
            for small batches where kernel launches dominate).
    """
    model.vae.encoder.compile(mode=mode)
    if model.unet is not None:
        model.unet.compile(mode=mode)
    if warmup is None:
        return 0.0
    started = time.perf_counter()
    warmup()
    synchronize(model.device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings mean something on CUDA and MPS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def apply_performance_options(
    model: LatentDiffusion,
    prompts: Iterable[str],
    low_memory: bool,
    compile: bool,
    console=None,
) -> None:
    """What ``mimicshield protect --low-memory --compile`` does after loading."""
    if low_memory:
        enable_low_memory(model, prompts=prompts)
    if compile:
        compile_model(model)
        if console is not None:
            console.print(
                "torch.compile: the first step at each new image size compiles the networks "
                "(a minute or more); later steps are faster."
            )
