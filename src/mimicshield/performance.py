"""Speed and memory options for a loaded :class:`~mimicshield.models.LatentDiffusion`.

What is already on by default, elsewhere:

- frozen weights and eval mode (``load_models``), so no weight gradient is ever computed;
- bf16 on CUDA that supports it and on CPUs with AMX, fp16 on MPS (``resolve_dtype``), the VAE
  in fp32 only where fp16 overflows (``vae_dtype_for``);
- the text embedding and the target latent computed once per run (``Protector``);
- SDPA attention: diffusers gives every attention layer ``AttnProcessor2_0``, which calls
  ``torch.nn.functional.scaled_dot_product_attention`` (flash or memory-efficient kernels on
  CUDA). :func:`attention_processors` reports it; ``mimicshield bench`` records it.

Also on by default, from here: :func:`stop_saving_frozen_conv_inputs` (``prepare_components``
calls it), which keeps the encoder backward from storing activations it never uses;
:func:`apply_performance_options`, which frees the networks a method never runs again; and
:class:`AutoBatchSize` (``--batch-size auto``).

What trades something away is opt-in: :func:`enable_low_memory` (compute for memory),
:func:`compile_model` (start-up time for step time), :func:`use_channels_last` (a layout to
measure), :func:`fuse_group_norm_silu` (compute for memory, to measure) and, in
:mod:`mimicshield.cudagraphs`, replaying a step from a CUDA graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .methods import get_method

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


# --- convolutions with frozen weights -------------------------------------------------------------
# PyTorch's convolution keeps its input for the backward pass even when the weight is frozen,
# because the weight gradient would need it; the input gradient needs only the weight. Every
# method here differentiates the encoder with respect to its *input*, so those saved inputs are
# pure waste: 37% of the SD VAE encoder's backward memory at 512 px (0.6 of 1.6 GiB at batch 1,
# bf16). No library offers a convolution that skips them, hence this small autograd function.


class _ConvInputGradientOnly(torch.autograd.Function):
    """conv2d whose backward computes only the input gradient, keeping only the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        grad_input = torch.nn.grad.conv2d_input(
            ctx.input_shape, weight, grad_output, stride, padding, dilation, groups
        )
        return grad_input, None, None, None, None, None, None


class FrozenConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` that stores nothing for backward while its weight and bias are frozen.

    Anything else (a trainable weight, string or non-zero padding modes, no input gradient)
    takes ``Conv2d``'s own path, so results never depend on which path ran.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        plain_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if frozen and plain_padding and input.requires_grad and torch.is_grad_enabled():
            return _ConvInputGradientOnly.apply(
                input, weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)


def stop_saving_frozen_conv_inputs(module: torch.nn.Module) -> int:
    """Turn every ``Conv2d`` in ``module`` into a :class:`FrozenConv2d`; returns how many.

    The class is swapped in place, so parameters, hooks and state-dict keys stay as they are.
    """
    count = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Conv2d:
            layer.__class__ = FrozenConv2d
            count += 1
    return count


# --- GroupNorm followed by SiLU, recomputed in the backward pass ---------------------------------
# In the VAE encoder nearly every GroupNorm feeds a SiLU, and autograd keeps two tensors of one
# size for the pair: the GroupNorm's input (for its own backward) and its output (for the
# SiLU's). The second is cheap to recompute from the first, so checkpointing each pair saves
# 0.45 of the 1.05 GiB the encoder backward keeps at 512 px in bf16 (scripts/backward_memory.py),
# for one more GroupNorm and SiLU forward per pair in the backward pass. Part of ``--low-memory``;
# for the default path, opt-in (``mimicshield bench --fused-norm``) until a GPU has measured what
# it costs in time.


class GroupNormSiLU(torch.nn.GroupNorm):
    """``silu(group_norm(x))`` in one module, keeping only ``x`` for the backward pass."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.is_grad_enabled() and input.requires_grad:
            # no random numbers inside: saving and restoring the RNG state every call is waste
            # (and reads the CUDA generator, which a graph capture must not)
            return checkpoint(self._norm_silu, input, use_reentrant=False, preserve_rng_state=False)
        return self._norm_silu(input)

    def _norm_silu(self, input: Tensor) -> Tensor:
        return F.silu(F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps))


def fuse_group_norm_silu(module: torch.nn.Module) -> int:
    """Turn every GroupNorm that directly feeds a SiLU in ``module`` (a VAE encoder) into a
    :class:`GroupNormSiLU` and the SiLU into an identity; returns how many pairs.

    Only where the SiLU follows nothing but those GroupNorms: diffusers' ``ResnetBlock2D``
    without a time embedding (the UNet's resnets also pass the time embedding through their
    SiLU) and the encoder's output norm. The class is swapped in place, so parameters and
    state-dict keys stay as they are.
    """
    from diffusers.models.resnet import ResnetBlock2D

    def fuse(norm: torch.nn.Module) -> int:
        if type(norm) is not torch.nn.GroupNorm:
            return 0
        norm.__class__ = GroupNormSiLU
        return 1

    count = 0
    for layer in module.modules():
        if (
            isinstance(layer, ResnetBlock2D)
            and layer.time_emb_proj is None
            and layer.time_embedding_norm == "default"
            and type(layer.nonlinearity) is torch.nn.SiLU
            and type(layer.norm1) is type(layer.norm2) is torch.nn.GroupNorm
        ):
            count += fuse(layer.norm1) + fuse(layer.norm2)
            layer.nonlinearity = torch.nn.Identity()
        norm_out, act = getattr(layer, "conv_norm_out", None), getattr(layer, "conv_act", None)
        if type(act) is torch.nn.SiLU and type(norm_out) is torch.nn.GroupNorm:
            count += fuse(norm_out)
            layer.conv_act = torch.nn.Identity()
    return count


def release_text_encoders(model: LatentDiffusion, prompts: Iterable[str]) -> None:
    """Embed ``prompts`` (cached on the model), then free the text encoders.

    Protection needs each prompt's embedding once, so the text encoder (CLIP ViT-L: 0.23 GiB in
    bf16; SDXL's two: 1.6 GiB) has no reason to stay on the accelerator. Nothing is released
    when there are no prompts to keep.
    """
    prompts = list(prompts)
    for prompt in prompts:
        model.embed_prompt(prompt)
    if prompts:
        model.release_text_encoder()


def enable_low_memory(
    model: LatentDiffusion, prompts: Iterable[str] = (), *, unet_gradients: bool = True
) -> bool:
    """Trade some compute for a smaller peak: for 4 GB cards and for large batches. Returns
    whether the UNet's weights now stream from CPU memory.

    - Gradient checkpointing in the VAE encoder: only each block's input is kept for the
      backward pass, and the block is run again there. This removes most of the activation
      memory of the encoder backward, which dominates every method, for about one more encoder
      forward per step. Within the re-run block, each GroupNorm+SiLU pair keeps only its input
      (:func:`fuse_group_norm_silu`): the first block's re-run then needs 0.25 GiB instead of
      0.50 at 512 px in bf16.
    - The UNet: with ``unet_gradients=False`` (the SDS methods), its weights live
      in CPU memory and stream to a CUDA device one block at a time, overlapped with compute
      (diffusers' group offloading): 1.6 GiB less in bf16 for the SD 1.x UNet. With gradients
      through it (AdvDM, Mist) it stays and uses gradient checkpointing instead, because
      offloading hooks move weights away before the backward pass needs them.
    - The text encoder is released once ``prompts`` are embedded (their embeddings stay cached).
    - Attention slicing only where SDPA is unavailable or on MPS: with SDPA's flash and
      memory-efficient kernels the attention matrix is never stored, and slicing would replace
      them with a slower processor that stores it slice by slice.
    """
    release_text_encoders(model, prompts)
    fuse_group_norm_silu(model.vae.encoder)
    model.vae.enable_gradient_checkpointing()
    if model.unet is not None:
        model.unet.enable_gradient_checkpointing()
        if model.device.type == "mps" or not uses_sdpa(model):
            model.unet.set_attention_slice("auto")
    streamed = model.unet is not None and not unet_gradients and model.device.type == "cuda"
    if streamed:
        offload_unet(model)
    release_cached_memory(model.device)
    return streamed


def offload_unet(model: LatentDiffusion, offload_device: str | torch.device = "cpu") -> None:
    """Keep the UNet's weights on ``offload_device``, bringing one block at a time to the model's
    device for its forward pass. Forward only: a backward through the UNet would find its
    weights gone. CUDA streams overlap the copies with compute.
    """
    model.unet.enable_group_offload(
        onload_device=model.device,
        offload_device=torch.device(offload_device),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=model.device.type == "cuda",
    )


# --- how many images per batch ----------------------------------------------------------------

AUTO_BATCH_LIMIT = 8  # past this, the step time per image hardly falls (BENCHMARKS.md)
MEMORY_HEADROOM = 0.8  # of the card's memory, for the allocator's caching and other processes
ACTIVATION_SAFETY = 1.5  # the backward pass's own short-lived tensors, on top of the saved ones


def saved_tensor_bytes(function: Callable[..., object], *args) -> int:
    """Bytes of the distinct tensors autograd keeps for ``function(*args)``'s backward pass,
    parameters excluded (they are in memory anyway), and views of them too (``F.linear`` saves
    ``weight.t()``: counted, the UNet's weights looked like 850 MiB of activations). Works on
    the meta device too."""
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        parameter = isinstance(tensor, torch.nn.Parameter) or isinstance(
            getattr(tensor, "_base", None), torch.nn.Parameter
        )
        if not parameter:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args)
    return sum(saved.values())


def parameter_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the modules' parameters (None entries count nothing)."""
    return sum(
        p.numel() * p.element_size()
        for module in modules
        if module is not None
        for p in module.parameters()
    )


def saved_bytes_per_pixel(model: LatentDiffusion, through_unet: bool = False) -> float:
    """Bytes autograd keeps for the step's backward, per input pixel, counted on small inputs.

    The networks are convolutional (their attention runs through SDPA, linear in memory on
    CUDA), so what they keep grows with the pixel count: the slope between forward passes at
    8 and 16 latent pixels square (64 and 128 px for SD) is the rate for this model, dtype and
    options, without what does not grow (the cross-attention's 77 text tokens). The SDS methods
    backpropagate through the encoder only; ``through_unet`` (AdvDM, Mist) adds the UNet's
    activations, which about double it.
    """
    t = torch.full((1,), model.num_train_timesteps // 2, device=model.device, dtype=torch.long)

    def kept(size: int) -> int:
        x = torch.zeros(1, 3, size, size, device=model.device, requires_grad=True)
        if not through_unet:
            return saved_tensor_bytes(model.encode, x)
        cond = model.condition("", 1, size, size)
        return saved_tensor_bytes(lambda x: model.predict_noise(model.encode(x), t, cond), x)

    small, large = 8 * model.vae_scale_factor, 16 * model.vae_scale_factor
    return max(0.0, (kept(large) - kept(small)) / (large * large - small * small))


def auto_batch_size(
    per_image_bytes: float, budget_bytes: float, limit: int = AUTO_BATCH_LIMIT
) -> int:
    """How many images of ``per_image_bytes`` fit in ``budget_bytes``: between 1 and ``limit``."""
    if per_image_bytes <= 0:
        return limit
    return max(1, min(limit, int(budget_bytes // per_image_bytes)))


class AutoBatchSize:
    """``--batch-size auto``: as many images of one size as the card holds, a function of the size.

    Only on CUDA, where batches pay (8 images cost about 2.3 times one on an H200); elsewhere,
    and with ``--low-memory``, 1. The budget is a share of the card's *total* memory, not of
    what is free right now, so the same device always picks the same batch (and the same bytes).
    If other work holds memory, the runner splits a batch that runs out of memory and retries.
    An ensemble keeps every model's weights but runs one model's step at a time.

    Create it right after loading: it runs the encoder (and, for AdvDM and Mist, the UNet)
    eagerly at a small size, which compiled networks would do only after compiling again.
    """

    def __init__(
        self,
        models: Iterable[LatentDiffusion],
        *,
        method: str = "sds-",
        low_memory: bool = False,
        limit: int = AUTO_BATCH_LIMIT,
    ) -> None:
        self.models = list(models)
        self.limit = limit
        self.method = method
        self.enabled = self.models[0].device.type == "cuda" and not low_memory
        # measured now, for both kinds of method (the web app's jobs choose theirs later)
        self._bytes_per_pixel = {
            through_unet: max(saved_bytes_per_pixel(m, through_unet) for m in self.models)
            for through_unet in ((False, True) if self.enabled else ())
        }

    def __call__(
        self, height: int, width: int, tile_size: int | None = None, method: str | None = None
    ) -> int:
        """The batch for images of ``height`` x ``width`` work pixels; larger than ``tile_size``,
        they are protected in tiles of at most that size (an upper bound of what a batch
        holds). ``method`` (default: the one given when created) decides whether the UNet's
        activations count."""
        from .methods import get_method

        if not self.enabled:
            return 1
        through_unet = get_method(method or self.method).backprops_unet
        if tile_size is not None:  # the tiles a batch holds, as resolution lays them out
            from .resolution import tile_shape

            height, width = tile_shape(height, width, tile_size)
        device = self.models[0].device
        total = torch.cuda.get_device_properties(device).total_memory
        weights = sum(  # the networks as they are now: released ones no longer count
            parameter_bytes(model.vae, model.unet, model.text_encoder, model.text_encoder_2)
            for model in self.models
        )
        per_image = self._bytes_per_pixel[through_unet] * height * width * ACTIVATION_SAFETY
        return auto_batch_size(per_image, MEMORY_HEADROOM * total - weights, self.limit)


def use_channels_last(model: LatentDiffusion, channels_last: bool = True) -> None:
    """Store the convolution weights channels-last (NHWC), or with False contiguous (NCHW);
    activations follow.

    Tensor-core convolution kernels work in NHWC, so on CUDA this can spare the layout
    transposes around each convolution. Whether it pays depends on the card and on GroupNorm's
    kernels, so it is measured (``mimicshield bench --channels-last``, and ``--channels-first``
    against the NHWC default of AMX CPUs) rather than assumed.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.vae.to(memory_format=layout)
    if model.unet is not None:
        model.unet.to(memory_format=layout)


def compile_model(
    model: LatentDiffusion,
    *,
    mode: str | None = None,
    warmup: Callable[[], object] | None = None,
    unet: bool = True,
) -> float:
    """``torch.compile`` the UNet and the VAE encoder in place; returns the compile seconds.

    Compilation happens on the first call with each new input shape, so the time is only known
    once something has run: pass ``warmup`` (e.g. one protection step at the real size) to pay it
    here and get it back; without it this returns 0.0 and the first step pays instead.

    Args:
        mode: a ``torch.compile`` mode: None (the default), ``"max-autotune-no-cudagraphs"``
            (longer compile, sometimes faster kernels) or ``"reduce-overhead"`` (CUDA graphs,
            for small batches where kernel launches dominate).
        unet: also the UNet; not one whose weights stream from CPU memory, whose offloading
            hooks move weights in the middle of its forward pass.
    """
    model.vae.encoder.compile(mode=mode)
    if unet and model.unet is not None:
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


def release_cached_memory(device: torch.device | None = None) -> None:
    """Hand the allocator's cached blocks back (after a model is dropped, between configurations).

    ``gc.collect()`` first: a traceback or a reference cycle may still hold the tensors. MPS
    keeps a cache of its own, which ``torch.cuda.empty_cache`` never reaches.
    """
    import gc

    gc.collect()
    kind = device.type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if kind in (None, "mps") and mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def apply_performance_options(
    model: LatentDiffusion,
    prompts: Iterable[str],
    low_memory: bool,
    compile: bool,
    console=None,
    *,
    method: str | None = None,
    compile_mode: str | None = None,
) -> None:
    """What ``mimicshield protect`` does after loading, for one ``method``.

    First the networks the method will not run again go: the text encoders once ``prompts`` are
    embedded, and the whole UNet for the methods that never call it (PhotoGuard, the encoder
    attack: 1.6 GiB in bf16). Then ``--low-memory`` and ``--compile`` apply; ``--low-memory``
    streams the UNet when the method does not backpropagate through it (and ``--compile``
    then leaves that UNet eager); ``compile_mode`` is a ``torch.compile`` mode. Without
    ``method`` (a model that other work shares, as in the web app) the UNet always stays.
    """
    spec = get_method(method) if method is not None else None
    if spec is not None and not spec.needs_unet:
        model.unet = None
        model.release_text_encoder()  # no UNet, no use for a prompt
    else:
        release_text_encoders(model, prompts)
    streamed = low_memory and enable_low_memory(
        model, unet_gradients=spec is None or spec.backprops_unet
    )
    if compile:
        compile_model(model, mode=compile_mode, unet=not streamed)
        if console is not None:
            console.print(
                "torch.compile: the first step at each new image size compiles the networks "
                "(a minute or more); later steps are faster."
            )
