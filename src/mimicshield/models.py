"""Loading Stable Diffusion components and the one adapter the protection maths talks to.

Every diffusers object stays behind :class:`LatentDiffusion` (in the spirit of k-diffusion's
``external.py``): the methods in :mod:`mimicshield.methods` only call ``encode``,
``predict_noise`` and read ``alphas_cumprod``. The adapter applies the VAE's own
``scaling_factor`` and makes "posterior sample versus posterior mean" an explicit argument.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .defaults import DEFAULT_MODEL
from .methods import eps_from_v_prediction
from .mps import check_mps_dtype
from .performance import stop_saving_frozen_conv_inputs
from .reproducibility import configure_cublas_workspace

if TYPE_CHECKING:
    from .configs import Vocabulary
    from .families import Family

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


# terminal colour and style codes (torch's "Weights only load failed" text is full of them)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape codes, which print as garbage outside a terminal."""
    return _ANSI_ESCAPE.sub("", text)


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it in one line.

    Messages quote errors of torch, diffusers and the hub, so escape codes are stripped here,
    once for every message that reaches the user.
    """

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(strip_ansi(str(message)), *args)


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is of a kind whose maths this version does not implement."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit choice must exist here.

    Checking up front turns torch's late "Torch not compiled with CUDA" into a one-line error.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        message = f"`device` must be auto, cuda, cuda:N, mps or cpu; got {device!r}."
        raise ValueError(message) from error
    for kind, available in (("cuda", torch.cuda.is_available), ("mps", _mps_available)):
        if chosen.type == kind and not available():
            raise ValueError(f"Device {device!r} is not available here; use auto or cpu.")
    return chosen


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _cuda_supports_bf16(device: torch.device | None = None) -> bool:
    """Native bf16 only (compute capability 8.0, Ampere, or newer): pre-Ampere GPUs report
    bf16 "supported" through slow emulation. Asked of ``device`` itself, not of the current
    device that ``torch.cuda.is_bf16_supported`` asks (an A100 as cuda:0, a T4 as cuda:1)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _cpu_has_amx() -> bool:
    """Intel AMX (Sapphire Rapids and later): bf16 matrix units that oneDNN convolutions use.

    Measured on such a Xeon (2 threads, BENCHMARKS.md): an ``sds-`` step at 256 px takes 2.3 s
    in bf16 against 5.8 s in fp32, and the encoder attack through the real TAEF2 encoder moves
    the latent 99.5-99.8 % as far as in fp32. CPUs without AMX keep fp32 (bf16 there is unmeasured).
    torch exposes the check only privately, so it is guarded.
    """
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA that supports it, fp16 on other CUDA and on MPS; on the CPU, bf16
    where it has AMX and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"`dtype` must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_supports_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if _cpu_has_amx() else torch.float32


def convolution_layout(device: torch.device) -> torch.memory_format:
    """Channels-last (NHWC) convolution weights on CPUs with AMX, where oneDNN runs them faster.

    Measured (BENCHMARKS.md, 2 threads): on an AMX Xeon an ``sds-`` step 1.5x faster in bf16
    and 1.1x in fp32 (256 px); on an AVX2 AMD EPYC, fp32, NCHW was 7 % faster instead (median
    of four alternating 128 px runs, ``mimicshield bench --channels-first``). GPUs keep NCHW
    until the bench has measured them.
    """
    use_nhwc = device.type == "cpu" and _cpu_has_amx()
    return torch.channels_last if use_nhwc else torch.contiguous_format


def vae_dtype_for(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The SD VAE overflows in fp16 (its config says ``force_upcast``): run it in fp32 then.

    bf16 has fp32's exponent range, so it never needs the upcast.
    """
    if dtype == torch.float16 and force_upcast:
        return torch.float32
    return dtype


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning c of one prompt, in the form the UNet takes it.

    SD 1.x/2.x only use ``hidden_states``. SDXL also needs the pooled embedding of its second
    text encoder and six size "time ids" (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w), which reach the UNet as ``added_cond_kwargs``.
    """

    hidden_states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning for every image of a batch (a view, no copy)."""
        return Conditioning(
            self.hidden_states.expand(batch, -1, -1),
            None if self.pooled is None else self.pooled.expand(batch, -1),
            None if self.time_ids is None else self.time_ids.expand(batch, -1),
        )

    def added_cond_kwargs(self, dtype: torch.dtype) -> dict[str, Tensor] | None:
        """SDXL's ``{"text_embeds", "time_ids"}`` for the UNet; None for SD 1.x/2.x."""
        if self.pooled is None or self.time_ids is None:
            return None
        return {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}


def sdxl_time_ids(height: int, width: int) -> Tensor:
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) for an uncropped image.

    SDXL pipelines default to exactly this for a ``height`` x ``width`` image, which is what a
    mimic's img2img run on the protected image at its own size conditions on.
    """
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


# how clip skip is counted here, said wherever it is taken (CLI help, errors, docstrings)
CLIP_SKIP_NUMBERING = (
    "1 = the text encoder's last layer (the default), 2 = the penultimate, as model cards, "
    "A1111 and civitai count; diffusers' own clip_skip is one less"
)


def check_clip_skip(clip_skip: int) -> int:
    """``clip_skip`` if it is a whole number of at least 1; a one-line ValueError otherwise."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(
            f"clip skip must be a whole number of at least 1 ({CLIP_SKIP_NUMBERING}); "
            f"got {clip_skip!r}."
        )
    return clip_skip


def diffusers_clip_skip(clip_skip: int) -> int | None:
    """diffusers' ``clip_skip`` for ours: it counts the layers skipped beyond the last one, so
    it is one less, and None (its default, the last layer) for 1."""
    return None if check_clip_skip(clip_skip) == 1 else clip_skip - 1


def max_clip_skip(num_hidden_layers: int, xl: bool) -> int:
    """The deepest clip skip a text encoder of ``num_hidden_layers`` layers has hidden states for.

    Its hidden states are the embeddings' output and each layer's (``num_hidden_layers + 1``);
    SDXL already starts one layer up, at the penultimate.
    """
    return num_hidden_layers if xl else num_hidden_layers + 1


def prompt_hidden_states(
    output, clip_skip: int, *, xl: bool, final_layer_norm: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The hidden states of one CLIP text encoder's ``output`` that the UNet is conditioned on.

    Computes what diffusers' pipelines compute with ``clip_skip=diffusers_clip_skip(clip_skip)``:

    * SD 1.x/2.x: clip skip 1 is ``output[0]``, the last layer through the final layer norm (the
      output of the encoder called as usual, so it is what it always was, to the bit); clip skip
      N > 1 is the N-th hidden state from the end, through the same ``final_layer_norm``, which
      keeps it on the scale the UNet was trained on.
    * SDXL: the (N+1)-th hidden state from the end, without the final norm: SDXL was trained on
      the penultimate layer as it is, so clip skip 1 is that.

    ``output`` must hold ``hidden_states`` (the encoder called with ``output_hidden_states``)
    for SDXL and for N > 1: :func:`needs_hidden_states`.
    """
    check_clip_skip(clip_skip)
    if xl:
        return output.hidden_states[-(clip_skip + 1)]
    if clip_skip == 1:
        return output[0]
    if final_layer_norm is None:
        raise ValueError("SD 1.x/2.x clip skip above 1 needs the text encoder's final layer norm.")
    return final_layer_norm(output.hidden_states[-clip_skip])


def needs_hidden_states(clip_skip: int, xl: bool) -> bool:
    """Whether :func:`prompt_hidden_states` reads the per-layer hidden states."""
    return xl or clip_skip > 1


def find_final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module | None:
    """A CLIP text encoder's final layer norm: on the model itself since transformers 5.6
    flattened ``CLIPTextModel``, under ``text_model`` before (and still in
    ``CLIPTextModelWithProjection``)."""
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    return norm


def encode_prompt_ids(
    text_encoder: torch.nn.Module, input_ids: Tensor, clip_skip: int, *, xl: bool
) -> tuple[Tensor, object]:
    """Run one text encoder on token ids: (the hidden states :func:`prompt_hidden_states`
    picks, the encoder's whole output, whose ``[0]`` is SDXL's pooled ``text_embeds``).

    Shared by :meth:`LatentDiffusion.embed_prompt` and textual inversion's training, so that
    protection and the mimicry simulations condition the UNet the same way.
    """
    output = text_encoder(input_ids, output_hidden_states=needs_hidden_states(clip_skip, xl))
    hidden = prompt_hidden_states(
        output, clip_skip, xl=xl, final_layer_norm=find_final_layer_norm(text_encoder)
    )
    return hidden, output


@dataclass
class LatentDiffusion:
    """The VAE encoder, UNet, text encoder and noise schedule of one latent diffusion model.

    Notation (name here -> paper): ``encode(x)`` -> E(x), ``predict_noise`` -> eps_theta,
    ``alphas_cumprod[t]`` -> abar_t.

    SDXL (``family="sdxl"``) adds ``text_encoder_2``/``tokenizer_2``; its conditioning comes
    from :meth:`condition`, which every family supports.

    ``clip_skip`` is the text encoder layer prompts are read from, counted as A1111 and model
    cards count it (1 = the last layer, 2 = the penultimate; diffusers' ``clip_skip`` is one
    less): :func:`prompt_hidden_states`. Many anime SD 1.x fine-tunes are prompted with 2.
    """

    # the networks and the schedule are left out of the repr (it printed 30,000 characters)
    vae: torch.nn.Module = field(repr=False)
    unet: torch.nn.Module | None = field(repr=False)
    text_encoder: torch.nn.Module | None = field(repr=False)
    tokenizer: object | None = field(repr=False)
    alphas_cumprod: Tensor = field(repr=False)
    scaling_factor: float
    prediction_type: str = "epsilon"
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    text_encoder_2: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer_2: object | None = field(default=None, repr=False)
    family: str = "sd1"
    # where the checkpoint's scheduler places inference steps (SDEdit, the mimicry pipelines)
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_skip: int = 1
    # keyed on (prompt, clip_skip): dataclasses.replace(model, clip_skip=2) shares the dict
    _prompt_cache: dict[tuple[str, int], Conditioning] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_clip_skip(self.clip_skip)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def is_xl(self) -> bool:
        return self.family == "sdxl"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int | None:
        """The pixel size the model was trained at (512, 768 for 2.x-v, 1024 for SDXL)."""
        if self.unet is None:
            return None
        size = self.unet.config.sample_size
        return int(max(size) if isinstance(size, list | tuple) else size) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of E(x) for an image of ``height`` x ``width`` pixels."""
        factor = self.vae_scale_factor
        return (self.vae.config.latent_channels, height // factor, width // factor)

    def encode(self, x: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        """E(x) = scaling_factor * (mean + std * posterior_noise); the mean when noise is None.

        ``x`` is in [-1, 1]. Gradients flow back to ``x``; the result is fp32.
        """
        dist = self.vae.encode(x.to(self.vae_dtype)).latent_dist
        latent = dist.mean if posterior_noise is None else dist.mean + dist.std * posterior_noise
        return self.scaling_factor * latent.float()

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Tensor | Conditioning) -> Tensor:
        """eps_theta(z_t, t, c) in fp32, whatever the UNet predicts.

        A v-prediction UNet's output is turned into epsilon here, so L_S and the SDS residual
        are both computed on the same eps_hat. ``cond`` is a :class:`Conditioning`, or for
        SD 1.x/2.x also the bare (B, tokens, dim) text embedding.
        """
        if self.unet is None:
            raise RuntimeError("This model was loaded without a UNet; semantic methods need one.")
        if not isinstance(cond, Conditioning):
            cond = Conditioning(cond)
        added = cond.added_cond_kwargs(self.dtype)
        if added is None and self.is_xl:
            raise ValueError("SDXL needs its pooled embedding and time ids: use model.condition().")
        out = self.unet(
            z_t.to(self.dtype),
            t,
            encoder_hidden_states=cond.hidden_states.to(self.dtype),
            added_cond_kwargs=added,
        ).sample.float()
        if self.prediction_type == "v_prediction":
            return eps_from_v_prediction(out, z_t.float(), t, self.alphas_cumprod)
        return out

    def condition(self, prompt: str, batch: int, height: int, width: int) -> Conditioning:
        """c for ``batch`` images of ``height`` x ``width`` pixels, as ``predict_noise`` takes it.

        The size only matters to SDXL, whose time ids say the image is uncropped at that size.
        """
        self.embed_prompt(prompt)
        cond = self._prompt_cache[(prompt, self.clip_skip)]
        if self.is_xl:
            time_ids = sdxl_time_ids(height, width).to(self.device)
            cond = Conditioning(cond.hidden_states, cond.pooled, time_ids)
        return cond.expand(batch)

    @torch.no_grad()
    def embed_prompt(self, prompt: str) -> Tensor:
        """c = text_encoder(tokenize(prompt)) at ``clip_skip``, computed once and cached.

        SD 1.x/2.x: the last hidden state, or with clip skip N > 1 the N-th from the end
        through the final layer norm. SDXL: both encoders' hidden states one layer further up
        (the penultimate for clip skip 1), concatenated, with the pooled embedding cached
        alongside for :meth:`condition`. What diffusers' pipelines compute with
        ``clip_skip=diffusers_clip_skip(self.clip_skip)`` (:func:`prompt_hidden_states`).
        """
        key = (prompt, self.clip_skip)
        if key in self._prompt_cache:
            return self._prompt_cache[key].hidden_states
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                "The text encoder was released; embed every prompt before releasing."
            )
        if not self.is_xl:
            embedding, _ = encode_prompt_ids(
                self.text_encoder, self._tokens(self.tokenizer, prompt), self.clip_skip, xl=False
            )
            self._prompt_cache[key] = Conditioning(embedding.to(self.dtype))
            return self._prompt_cache[key].hidden_states
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise RuntimeError("This SDXL model has no second text encoder.")
        first, _ = encode_prompt_ids(
            self.text_encoder, self._tokens(self.tokenizer, prompt), self.clip_skip, xl=True
        )
        second, output = encode_prompt_ids(
            self.text_encoder_2, self._tokens(self.tokenizer_2, prompt), self.clip_skip, xl=True
        )
        hidden = torch.cat([first, second], dim=-1)
        pooled = output[0]  # CLIPTextModelWithProjection's text_embeds
        self._prompt_cache[key] = Conditioning(hidden.to(self.dtype), pooled.to(self.dtype))
        return self._prompt_cache[key].hidden_states

    def _tokens(self, tokenizer, prompt: str) -> Tensor:
        return tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def release_text_encoder(self) -> None:
        """Free the text encoders' memory once every prompt is embedded."""
        self.text_encoder = None
        self.text_encoder_2 = None


_LOCAL_PATH_HINT = "pass a local diffusers folder or a .safetensors/.ckpt file with --model PATH"


def _one_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message: hub and torch errors run to several lines."""
    lines = [line.strip() for line in strip_ansi(str(error)).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# what diffusers says, in an OSError of its own, for a repo or file that is not there
_NOT_FOUND_TEXTS = (
    "is not a local folder and is not a valid model identifier",
    "does not appear to have a file named",
    "couldn't find it in the cached files",
)
# ... and for a hub it could not reach
_NETWORK_TEXTS = ("specific connection error", "couldn't connect to")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _is_not_found(error: BaseException) -> bool:
    """Whether ``error`` means the repo or file is not there (not in the cache, when offline).

    huggingface_hub raises LocalEntryNotFoundError, RepositoryNotFoundError or
    EntryNotFoundError; diffusers and transformers re-raise them as an OSError of their own,
    usually chained. Anything else (a broken config, a shape mismatch) is a real problem of a
    model that *was* found, and is reported as such.
    """
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    return any(
        isinstance(seen, EntryNotFoundError | RepositoryNotFoundError)
        or (isinstance(seen, OSError) and any(text in str(seen) for text in _NOT_FOUND_TEXTS))
        for seen in _chain(error)
    )


def _is_network_error(error: BaseException) -> bool:
    """Whether ``error`` is the hub being unreachable (or refusing), not the model failing."""
    from huggingface_hub.errors import HfHubHTTPError

    return any(
        isinstance(seen, HfHubHTTPError | ConnectionError | TimeoutError)
        or (isinstance(seen, OSError) and any(text in str(seen) for text in _NETWORK_TEXTS))
        for seen in _chain(error)
    )


def _is_unavailable(error: BaseException, local_files_only: bool) -> bool:
    """A hub model that is not there, or (online) could not be fetched: say how to get it."""
    return _is_not_found(error) or (not local_files_only and _is_network_error(error))


def _load_error(source: str, cause: Exception, local_files_only: bool) -> ModelLoadError:
    """The one line for a hub id that could not be got (not found, or the network)."""
    if local_files_only:
        return ModelLoadError(
            f"Model {source!r} is not a local folder and not in the local hub cache, and downloads "
            f"are off (offline); {_LOCAL_PATH_HINT}."
        )
    return ModelLoadError(
        f"Could not get model {source!r} from the Hugging Face hub ({type(cause).__name__}: "
        f"{_one_line(cause)}); check the id and the network connection (HF_HUB_OFFLINE=1 reads "
        f"only the local cache), or {_LOCAL_PATH_HINT}."
    )


def _component_error(source: str, name: str, cause: Exception) -> ModelLoadError:
    """The one line for a component of a model that was found but does not load."""
    return ModelLoadError(
        f"{source}: could not load its {name} ({type(cause).__name__}: {_one_line(cause)})."
    )


def check_model_source(source: str) -> None:
    """Fail at once on a path that is not there or not a model (before minutes of loading,
    or, in the web app, before the first job); a hub id is only checked when it loads."""
    path = Path(source).expanduser()
    if not path.exists() and looks_like_path(source):
        raise ModelLoadError(f"{source}: no such model folder or checkpoint file.")
    if path.is_file() and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{source}: not a model; --model takes a hub id, a diffusers folder, or a "
            ".safetensors/.ckpt checkpoint."
        )


def _check_supported(prediction_type: str, source: str, hint: str = "") -> None:
    """Refuse what the maths does not cover: every method needs eps_theta.

    Epsilon models give it directly and v-prediction models through ``eps_from_v_prediction``;
    any other parametrisation (e.g. x0, "sample") is refused rather than silently misread.
    """
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise UnsupportedModelError(
            f"Model {source!r} uses prediction_type={prediction_type!r}; this version supports "
            f"epsilon and v_prediction checkpoints (SD 1.x, SD 2.x, SDXL) only.{hint}"
        )


# Schedulers of models whose maths is not DDPM's (flow matching, EDM/Karras sigmas): a
# DDPMScheduler read from their config would fall back to default betas, silently wrong.
UNSUPPORTED_SCHEDULERS = ("FlowMatch", "EDM")


def _check_scheduler_class(class_name: str, source: str) -> None:
    """Refuse a scheduler config whose noise process is not the DDPM one the maths assumes."""
    if any(kind in class_name for kind in UNSUPPORTED_SCHEDULERS):
        raise UnsupportedModelError(
            f"Model {source!r} has a {class_name} scheduler (not a DDPM noise schedule); this "
            "version supports SD 1.x, SD 2.x and SDXL checkpoints only."
        )


def _check_latent_space(vae: torch.nn.Module, source: str) -> None:
    """Refuse a VAE that shifts or normalises its latents (``shift_factor``, ``latents_mean``:
    SD3, FLUX and Playground-v2.5-style VAEs): E(x) here is ``scaling_factor * mean`` only."""
    config = vae.config
    shifted = config.get("shift_factor") not in (None, 0, 0.0)
    if shifted or config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise UnsupportedModelError(
            f"Model {source!r}: its VAE shifts or normalises latents (shift_factor / "
            "latents_mean / latents_std); this version supports the SD 1.x, SD 2.x and SDXL "
            "latent spaces only."
        )


def _check_unet(unet: torch.nn.Module, vae: torch.nn.Module, source: str, inpainting: bool) -> None:
    """Refuse a UNet that takes inputs or conditioning the methods never hand it."""
    from .families import check_unet_conditioning, check_unet_inputs

    check_unet_conditioning(unet.config, source)
    in_channels, latent_channels = unet.config.in_channels, vae.config.latent_channels
    check_unet_inputs(in_channels, latent_channels, source, inpainting=inpainting)


# weights a VAE needs only to decode, which protection drops (``with_decoder=False``)
_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
# CLIP's prompt length, for a text encoder whose config does not say
MAX_PROMPT_TOKENS = 77


def _check_tokenizers(parts: Mapping[str, object], source: str) -> None:
    """Refuse a tokenizer without a vocabulary or a usable prompt length, naming it.

    transformers loads an empty ``tokenizer/`` folder without an error: a tokenizer with only
    its special tokens and ``model_max_length`` at its "unset" value (about 1e30), which fails
    much later, when the first prompt is encoded, with "OverflowError: int too big to convert".
    """
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = parts.get(name)
        if tokenizer is None:
            continue
        encoder = parts.get("text_encoder" if name == "tokenizer" else "text_encoder_2")
        config = getattr(encoder, "config", None)
        positions = getattr(config, "max_position_embeddings", None) or MAX_PROMPT_TOKENS
        length = getattr(tokenizer, "model_max_length", None)
        special = set(getattr(tokenizer, "all_special_tokens", ()))
        if len(tokenizer) <= len(special):
            raise ModelLoadError(
                f"{source}: its {name} has no vocabulary (its folder lacks vocab.json and "
                "merges.txt, or tokenizer.json): re-download or re-save the model."
            )
        if not isinstance(length, int) or not 1 <= length <= positions:
            raise ModelLoadError(
                f"{source}: its {name} has no usable model_max_length ({length!r}; the text "
                f"encoder takes {positions} tokens): set it in {name}/tokenizer_config.json, "
                "or re-download the model."
            )


_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _check_clip_skip_layers(
    layers: Mapping[str, object], clip_skip: int, xl: bool, source: str
) -> None:
    """Refuse a clip skip deeper than a text encoder's layers (by component name), naming how
    deep it can go. A count that is not a whole number (unknown) is not checked."""
    for name, count in layers.items():
        if isinstance(count, bool) or not isinstance(count, int):
            continue
        if clip_skip > max_clip_skip(count, xl):
            raise ModelLoadError(
                f"{source}: clip skip {clip_skip} is deeper than its {name} ({count} layers) "
                f"goes; the most it takes is {max_clip_skip(count, xl)} ({CLIP_SKIP_NUMBERING})."
            )


def _check_clip_skip_depth(
    parts: Mapping[str, object], clip_skip: int, xl: bool, source: str
) -> None:
    """:func:`_check_clip_skip_layers` on loaded text encoders: the check after loading, for
    models whose configs could not be read before (:func:`_check_configured_clip_skip`)."""
    layers = {
        name: getattr(getattr(parts.get(name), "config", None), "num_hidden_layers", None)
        for name in _TEXT_ENCODERS
    }
    _check_clip_skip_layers(layers, clip_skip, xl, source)


def at_clip_skip(model: LatentDiffusion, clip_skip: int) -> LatentDiffusion:
    """``model`` reading prompts at another ``clip_skip`` without loading it again: the copy
    shares the weights and the prompt cache (keyed on the clip skip). Refused as
    :func:`load_models` refuses it; released text encoders leave the depth unchecked, but then
    no new prompt can be embedded anyway."""
    check_clip_skip(clip_skip)
    if clip_skip == model.clip_skip:
        return model
    parts = {"text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    _check_clip_skip_depth(parts, clip_skip, model.is_xl, model.name)
    return replace(model, clip_skip=clip_skip)


def _configured_layers(config_file: Path | None) -> int | None:
    """``num_hidden_layers`` of a text encoder's ``config.json``; None where it cannot be read
    (missing, broken, not saying), which leaves the check to the loaded encoder."""
    if config_file is None:
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "clip" and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # a full CLIP config, as transformers reads it
    layers = config.get("num_hidden_layers")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def _check_configured_clip_skip(
    config_file: Callable[[str], Path | None], clip_skip: int, xl: bool, source: str
) -> None:
    """Refuse a too-deep clip skip from the text encoders' configs, before any weight is read.

    ``config_file`` gives a component's ``config.json`` (None where it cannot be had). Only
    the first text encoder without ``xl``; SDXL's second one too.
    """
    if clip_skip == 1:  # every encoder has a last layer: nothing to read
        return
    names = _TEXT_ENCODERS if xl else _TEXT_ENCODERS[:1]
    layers = {name: _configured_layers(config_file(name)) for name in names}
    _check_clip_skip_layers(layers, clip_skip, xl, source)


def _check_weights_present(
    parts: Mapping[str, object],
    missing: Mapping[str, list[str]],
    source: str,
    *,
    with_decoder: bool = True,
) -> None:
    """Refuse components whose files lacked weights, naming the component.

    diffusers leaves such weights on the meta device (moving them fails later with a bare
    "Cannot copy out of meta tensor"), transformers fills them with random values and goes on:
    a text encoder half random would make every protection silently wrong. ``missing`` holds
    what the loaders reported; meta tensors are found here. The VAE decoder only counts when
    it is kept.
    """
    for name, module in parts.items():
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = [*module.named_parameters(), *module.named_buffers()]
        gaps = set(missing.get(name, ())) | {key for key, tensor in tensors if tensor.is_meta}
        if name == "vae" and not with_decoder:
            gaps = {key for key in gaps if not key.startswith(_DECODER_PREFIXES)}
        if gaps:
            example = sorted(gaps)[0]
            raise ModelLoadError(
                f"{source}: its {name} is missing {len(gaps)} weight tensor(s) (e.g. {example}); "
                "its files are incomplete or of another architecture: re-download or re-save "
                "the model."
            )


CPU_ALIGNMENT = 64  # bytes: what PyTorch's own CPU allocator gives every new tensor


def realign_tensors(module: torch.nn.Module) -> int:
    """Copy the CPU weights a checkpoint left at unaligned addresses into fresh memory; returns
    how many were copied.

    A tensor read from a ``.safetensors`` or ``.ckpt`` file sits wherever its bytes sit in the
    file's buffer. The CPU's matrix kernels treat unaligned data differently and round
    differently in the last bit: the same weights loaded from a single file and from a folder
    gave different noise predictions (seen on an AVX2 EPYC, where 175 of the tiny UNet's 208
    single-file weights were unaligned). Realigned, equal weights give equal bytes.
    """
    count = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()
            count += 1
    return count


def prepare_components(
    vae: torch.nn.Module,
    others: list[torch.nn.Module | None],
    device: torch.device,
    dtype: torch.dtype,
    *,
    with_decoder: bool = False,
) -> torch.dtype:
    """Set components up for protection: frozen, in eval mode, on ``device`` in ``dtype``.

    The VAE decoder is dropped unless asked for (the methods only encode: a third of the VAE's
    memory), and the VAE stays fp32 where its config says fp16 overflows. Convolution weights
    take the device's faster layout (:func:`convolution_layout`). The convolutions stop
    keeping their inputs for a weight gradient that frozen weights never need
    (:func:`~mimicshield.performance.stop_saving_frozen_conv_inputs`). Weights a checkpoint
    left unaligned get memory of their own (:func:`realign_tensors`). Returns the VAE's dtype.
    Shared by :func:`load_models` and the bench, so the bench times what users run.
    """

    if not with_decoder:
        vae.decoder = None
        vae.post_quant_conv = None
    vae_dtype = vae_dtype_for(dtype, bool(vae.config.get("force_upcast", False)))
    modules = [(vae, vae_dtype)] + [(module, dtype) for module in others if module is not None]
    layout = convolution_layout(device)
    for module, module_dtype in modules:
        module.to(device=device, dtype=module_dtype, memory_format=layout)
        realign_tensors(module)
        module.requires_grad_(False)
        module.eval()
        stop_saving_frozen_conv_inputs(module)
    return vae_dtype


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, in the truthy spellings huggingface_hub accepts."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def load_models(
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    with_decoder: bool = False,
    single_file_config: str | None = None,
    local_files_only: bool | None = None,
    family: str | None = None,
    inpainting: bool = False,
    clip_skip: int = 1,
) -> LatentDiffusion:
    """Load what the protection methods need: the VAE encoder, UNet, text encoder and schedule.

    Args:
        source: a hub id, a local diffusers folder, or a single ``.safetensors``/``.ckpt`` file.
        device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        dtype: ``auto``, ``fp32``, ``fp16``, ``bf16`` or a ``torch.dtype``; the VAE stays fp32
            where fp16 overflows (its config's ``force_upcast``). ``auto`` is bf16 on GPUs and
            CPUs that have it natively (Ampere and later; Intel AMX), fp16 on other GPUs and
            MPS, fp32 elsewhere: unlike diffusers, not always fp32 on the CPU.
        with_decoder: keep the VAE decoder (for mimicry simulations); dropped otherwise.
        single_file_config: for a single file, a diffusers folder (or hub id) whose configs and
            tokenizer describe the checkpoint's architecture, VAE scale and scheduler, or a
            folder holding only a CLIP ``tokenizer/``. Without it the configs of the family's
            reference model are used (offline: only from the local hub cache), and where those
            cannot be had, the ones built into mimicshield, with a CLIP tokenizer from the hub
            cache or an installed ``open_clip``.
        local_files_only: never touch the network; defaults to ``HF_HUB_OFFLINE``.
        family: ``sd1``, ``sd2-base``, ``sd2-v`` or ``sdxl`` (see :mod:`mimicshield.families`);
            None detects it from the files. ``sd2-base``/``sd2-v`` also set the prediction type.
        inpainting: the model is wanted as an inpainting model (mimicry's ``--inpaint-model``):
            a 9-channel inpainting UNet is accepted (a plain one too), and a single file's
            configs default to its family's inpainting model. Otherwise a UNet that takes more
            than the latents (inpainting, upscaler, InstructPix2Pix, depth) is refused.
        clip_skip: the text encoder layer prompts are read from: 1 = the last (the default),
            2 = the penultimate, as model cards, A1111 and civitai count it; diffusers'
            ``clip_skip`` is one less. A value deeper than the text encoder is refused, from
            its config before the weights load where the config can be read.

    Models the methods would run wrongly are refused with :class:`UnsupportedModelError`, and
    components with weights missing from their files with :class:`ModelLoadError`.

    For the whole process: sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless it is set), which
    cuBLAS reads at its first use and deterministic mode needs.
    """
    # Before anything runs on the GPU: cuBLAS sizes its workspace once, at its first use, and
    # the protection's deterministic mode needs the reproducible setting.
    configure_cublas_workspace()
    check_clip_skip(clip_skip)
    torch_device = resolve_device(device)
    torch_dtype = check_mps_dtype(resolve_dtype(dtype, torch_device), torch_device)
    if local_files_only is None:
        local_files_only = hub_offline()

    if family is not None:
        from .families import get_family

        get_family(family)  # an unknown name fails before anything loads
    source = str(source)
    check_model_source(source)
    path = Path(source).expanduser()
    if single_file_config is not None and not path.is_file():
        warnings.warn(
            f"--model-config {single_file_config} is ignored: it only applies to a single "
            f".safetensors/.ckpt file, and {source} is a diffusers folder or hub id with configs "
            "of its own.",
            stacklevel=2,
        )
    with _quiet_loading():
        if path.is_file():
            parts, chosen, missing = _load_single_file(
                path, single_file_config, local_files_only, family, inpainting, clip_skip
            )
        else:
            parts, chosen, missing = _load_diffusers_folder(
                source, local_files_only, family, clip_skip
            )
        vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
        text_encoder, text_encoder_2 = parts["text_encoder"], parts.get("text_encoder_2")

        configured = scheduler.config.get("prediction_type", "epsilon")
        prediction_type = chosen.prediction_type or configured
        _check_supported(prediction_type, source)
        _check_latent_space(vae, source)
        _check_unet(unet, vae, source, inpainting)
        _check_weights_present(parts, missing, source, with_decoder=with_decoder)
        _check_tokenizers(parts, source)
        _check_clip_skip_depth(parts, clip_skip, chosen.is_xl, source)
        vae_dtype = prepare_components(
            vae,
            [unet, text_encoder, text_encoder_2],
            torch_device,
            torch_dtype,
            with_decoder=with_decoder,
        )

    # abar_t follows the checkpoint's own schedule (betas, num_train_timesteps). The scheduler's
    # timestep_spacing only places *inference* steps; training-style t ~ U{0..T-1}, as the
    # methods sample it, reads alphas_cumprod directly and never depends on it.
    return LatentDiffusion(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=parts["tokenizer"],
        alphas_cumprod=floor_terminal_snr(scheduler.alphas_cumprod).to(torch_device, torch.float32),
        scaling_factor=float(vae.config.scaling_factor),
        prediction_type=prediction_type,
        name=str(source),
        device=torch_device,
        dtype=torch_dtype,
        vae_dtype=vae_dtype,
        text_encoder_2=text_encoder_2,
        tokenizer_2=parts.get("tokenizer_2"),
        family=chosen.name,
        timestep_spacing=str(scheduler.config.get("timestep_spacing", "leading")),
        steps_offset=int(scheduler.config.get("steps_offset", 0)),
        clip_skip=clip_skip,
    )


# What diffusers' Euler scheduler floors a zero-terminal-SNR schedule's last abar at.
ZERO_SNR_FLOOR = 2.0**-24


def floor_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """abar_t, with a zero-terminal-SNR schedule's abar_T = 0 raised to 2^-24.

    x̂0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar) divides by it (SDEdit at strength 1, the
    DDIM steps); for the v-prediction models such schedules are trained with, x̂0 stays
    sqrt(abar) z_t - sqrt(1 - abar) v to within 1e-3. Other schedules never come near it.
    """
    return alphas_cumprod.clamp(min=ZERO_SNR_FLOOR)


@contextmanager
def _quiet_loading():
    """Silence per-weight progress bars and dtype notices while loading; errors still raise."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging, hub_logging)
    levels = [logger.get_verbosity() for logger in loggers]
    bars = (diffusers_logging, transformers_logging)
    bars_enabled = [bar.is_progress_bar_enabled() for bar in bars]
    for logger in loggers:
        # CRITICAL, not ERROR: diffusers logs an "error" when it falls back from .safetensors to
        # .bin weights and then loads fine; real failures still raise and are reported by us
        logger.set_verbosity(logging.CRITICAL)
    for bar in bars:
        bar.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.set_verbosity(level)
        for bar, enabled in zip(bars, bars_enabled, strict=True):
            if enabled:
                bar.enable_progress_bar()


_COMPONENTS = ("scheduler", "vae", "unet", "text_encoder", "tokenizer")
# what diffusers itself fetches for a single file's config: configs and tokenizer, no weights
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]


def looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that looks like a path is one."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix in SINGLE_FILE_SUFFIXES
    )


def _load_diffusers_folder(
    source: str, local_files_only: bool, family: str | None, clip_skip: int = 1
) -> tuple[dict, Family, dict[str, list[str]]]:
    """Load each component on its own, so the safety checker and feature extractor never load.

    For a hub id only the subfolders the family needs are downloaded (and ``model_index.json``,
    which names the pipeline), never the safety checker's weights. A ``clip_skip`` deeper than
    the text encoders' configs say is refused before any weight is read. Returns the components
    by name, the :class:`~mimicshield.families.Family` they were loaded as, and the weights each
    component's files lacked (left random or on the meta device: refused later).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .families import (
        FAMILIES,
        check_architecture,
        check_pipeline_supported,
        folder_family,
        get_family,
    )

    folder = Path(source).expanduser()
    is_local = folder.is_dir()
    if is_local:
        source = str(folder)
    model_index = _model_index(source, folder if is_local else None, local_files_only)
    check_pipeline_supported(model_index, source)
    if is_local:
        _require_subfolders(folder, _COMPONENTS, source)
    # SDXL for sure only when the index names a second encoder; else the looser SD 1.x/2.x
    # bound, so this never refuses what the check after loading would take
    xl = "text_encoder_2" in model_index
    config_file = partial(_component_config, source, folder if is_local else None, local_files_only)
    _check_configured_clip_skip(config_file, clip_skip, xl, source)
    loader = _ComponentLoader(source, folder if is_local else None, local_files_only)

    try:  # the class the checkpoint names, before DDPMScheduler reads its config as its own
        scheduler_class = DDPMScheduler.load_config(
            source, subfolder="scheduler", local_files_only=local_files_only
        ).get("_class_name", "")
    except (OSError, ValueError):
        scheduler_class = ""  # the load below reports a missing or broken config
    _check_scheduler_class(str(scheduler_class), source)
    parts = {
        "scheduler": loader.load("scheduler", DDPMScheduler),
        "vae": loader.load("vae", AutoencoderKL),
        "unet": loader.load("unet", UNet2DConditionModel),
    }
    configured = parts["scheduler"].config.get("prediction_type", "epsilon")
    detected = folder_family(model_index, parts["unet"].config, configured)
    chosen = FAMILIES[detected] if family is None else get_family(family)
    check_architecture(chosen, detected, source)
    text = {"text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}
    if chosen.is_xl:
        text.update(text_encoder_2=CLIPTextModelWithProjection, tokenizer_2=CLIPTokenizer)
        if is_local:
            _require_subfolders(folder, ("text_encoder_2", "tokenizer_2"), source)
    parts.update({name: loader.load(name, cls) for name, cls in text.items()})
    loader.report_variants()
    return parts, chosen, loader.missing


# components with weight files, which diffusers/transformers may also hold as an fp16 variant
_WEIGHTED = ("vae", "unet", "text_encoder", "text_encoder_2")
_VARIANT = "fp16"


class _ComponentLoader:
    """``from_pretrained`` of one folder's or hub repo's components, with one-line errors.

    Records the weights each component's files lacked (``missing``): diffusers leaves them on
    the meta device and transformers initialises them at random, both without an error. A
    component whose only weights are ``*.fp16.*`` files (repos that publish only the fp16
    variant) is loaded from those, and said once (:meth:`report_variants`).
    """

    def __init__(self, source: str, folder: Path | None, local_files_only: bool) -> None:
        self.source, self.folder, self.local_files_only = source, folder, local_files_only
        self.missing: dict[str, list[str]] = {}
        self.variants: list[str] = []

    def load(self, name: str, cls):
        try:
            return self._from_pretrained(name, cls)
        except (OSError, ValueError) as error:
            if name in _WEIGHTED and self._has_variant_only(name, error):
                try:
                    model = self._from_pretrained(name, cls, variant=_VARIANT)
                except (OSError, ValueError):
                    pass  # no variant either: the first error says what is missing
                else:
                    self.variants.append(name)
                    return model
            if self.folder is None and _is_unavailable(error, self.local_files_only):
                raise _load_error(self.source, error, self.local_files_only) from error
            raise _component_error(self.source, name, error) from error

    def _from_pretrained(self, name: str, cls, **kwargs):
        options = {"subfolder": name, "local_files_only": self.local_files_only, **kwargs}
        if name not in _WEIGHTED:
            return cls.from_pretrained(self.source, **options)
        model, info = cls.from_pretrained(self.source, output_loading_info=True, **options)
        if info.get("missing_keys"):
            self.missing[name] = sorted(info["missing_keys"])
        return model

    def _has_variant_only(self, name: str, error: Exception) -> bool:
        """Whether the plain weights are missing and the variant may be there.

        A local folder shows its files; of a hub repo only trying the variant can tell.
        """
        if self.folder is None:
            return _is_not_found(error)
        weights = [*(self.folder / name).glob("*.safetensors"), *(self.folder / name).glob("*.bin")]
        variants = [file for file in weights if f".{_VARIANT}." in file.name]
        return bool(variants) and len(variants) == len(weights)

    def report_variants(self) -> None:
        if self.variants:
            warnings.warn(
                f"{self.source}: its {', '.join(self.variants)} weights exist only as the "
                f"{_VARIANT} variant (*.{_VARIANT}.safetensors); loaded those.",
                stacklevel=4,
            )


def _model_index(source: str, folder: Path | None, local_files_only: bool) -> dict:
    """The pipeline's ``model_index.json``; from a local folder without one, its subfolders.

    A hub repo or cache without the file gives {}: the components then decide on their own.
    """
    if folder is not None:
        index = folder / "model_index.json"
        if index.is_file():
            try:
                return json.loads(index.read_text(encoding="utf-8"))
            except ValueError as error:
                raise _component_error(source, "model_index.json", error) from error
        return {sub.name: [None, None] for sub in folder.iterdir() if sub.is_dir()}

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(source, "model_index.json", local_files_only=local_files_only)
    except EntryNotFoundError:  # also "not in the offline cache": the components will say
        return {}
    except (OSError, ValueError) as error:
        if _is_unavailable(error, local_files_only):
            raise _load_error(source, error, local_files_only) from error
        raise _component_error(source, "model_index.json", error) from error
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # a hub repo or cache with a broken file
        raise _component_error(source, "model_index.json", error) from error


def _component_config(
    source: str, folder: Path | None, local_files_only: bool, name: str
) -> Path | None:
    """A component's ``config.json`` in a local folder, or fetched alone from the hub (cached
    for the load after); None where the hub does not give it."""
    if folder is not None:
        return folder / name / "config.json"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = hf_hub_download(source, f"{name}/config.json", local_files_only=local_files_only)
    except (*hub_errors(), EntryNotFoundError):  # the load after says what is wrong
        return None
    return Path(file)


def _require_subfolders(folder: Path, names: tuple[str, ...], source: str) -> None:
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{source}: not a Stable Diffusion diffusers folder (no {', '.join(missing)} "
            "subfolder); pass one saved with save_pretrained, or a .safetensors/.ckpt file."
        )


def _load_single_file(
    path: Path,
    config: str | None,
    local_files_only: bool,
    family: str | None,
    inpainting: bool = False,
    clip_skip: int = 1,
) -> tuple[dict, Family, dict[str, list[str]]]:
    """Load an original-format (CompVis/LDM/SGM) checkpoint through diffusers' own converter.

    The file holds weights only. The architecture, the VAE's ``scaling_factor`` and
    ``force_upcast``, the tokenizers and the scheduler (so ``prediction_type``) come from
    ``config``, a diffusers folder or hub id; without one, from the hub configs of the family's
    reference model (offline: only from the local hub cache), its inpainting model's for a
    9-channel UNet. Where those cannot be had (offline with an empty cache, or the hub failing),
    from the configs built into mimicshield (:mod:`mimicshield.configs`), completed with a CLIP
    tokenizer found on this machine, or given as a ``config`` folder holding only ``tokenizer/``.
    The family comes from ``family``, else from ``config``, else from the
    file's key names; the prediction type from what the file declares (marker keys, metadata).
    An LDM ``.ckpt`` with EMA weights loads those. A ``clip_skip`` deeper than the configs'
    text encoders is refused before diffusers reads the weights. Returns what
    :func:`_load_diffusers_folder` returns (no missing weights: diffusers leaves them on meta).
    """
    import diffusers

    from .families import (
        check_architecture,
        checkpoint_family,
        checkpoint_schedule,
        get_family,
        inpainting_family,
        sd2_family,
    )

    overridden = get_family(family) if family is not None else None
    summary = _read_checkpoint(path)
    detected = checkpoint_family(summary.keys, path.name)
    is_inpainting = _is_inpainting_file(summary, path, inpainting)
    if is_inpainting:
        detected = inpainting_family(detected)
    declared = checkpoint_schedule(summary.keys, path.name, summary.metadata)
    config_dir = config_family = tokenizer_folder = None
    if config is not None:
        guess = overridden or get_family(detected)  # only names the family in error messages
        tokenizer_folder = _tokenizer_only_folder(config)
        if tokenizer_folder is None:
            config_dir = _single_file_config(path, config, local_files_only, guess)
            config_family = _config_family(Path(config_dir))
    chosen = overridden or get_family(config_family or detected)
    if overridden is None and chosen.prediction_type and "prediction_type" in declared:
        chosen = get_family(sd2_family(str(declared["prediction_type"])))  # the file says
    elif overridden is not None and overridden.prediction_type:  # the user said
        declared.pop("prediction_type", None)
    check_architecture(chosen, detected, path.name)
    if config_dir is None and overridden is None and detected == "sd2-v" and not declared:
        warnings.warn(
            f"{path.name}: an SD 2.x file does not say whether it is 768-v or 512-base; "
            "assuming 768-v (v-prediction) as diffusers does. For a 512-base fine-tune pass "
            "--family sd2-base.",
            stacklevel=3,
        )
    if config_dir is not None:
        folder, origin = nullcontext(config_dir), None
    else:
        folder, origin = _family_configs(
            path, chosen, is_inpainting, tokenizer_folder, local_files_only
        )
    with folder as config_folder:
        # the text encoders are built from these configs, so they say how deep they go
        configs = Path(config_folder)
        _check_configured_clip_skip(
            lambda name: configs / name / "config.json", clip_skip, chosen.is_xl, str(path)
        )
        try:
            pipe = getattr(diffusers, chosen.pipeline).from_single_file(
                str(path),
                config=config_folder,
                local_files_only=local_files_only,
                **_single_file_options(chosen, path, summary),
            )
        except _single_file_errors() as error:
            raise _single_file_load_error(path, error, origin) from error
    parts = {
        "vae": pipe.vae,
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": _declared_scheduler(
            pipe.scheduler.config, declared, path.name, warn=origin is None
        ),
    }
    if chosen.is_xl:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return parts, chosen, {}


def _is_inpainting_file(summary: CheckpointSummary, path: Path, inpainting: bool) -> bool:
    """Whether the file's UNet is an inpainting one; other non-latent inputs are refused.

    Read from ``conv_in``'s weight shape, before any config is fetched: diffusers tells
    inpainting files apart the same way.
    """
    from .families import INPAINTING, check_unet_inputs, unet_kind

    channels = summary.unet_in_channels
    if channels is None:
        return False
    check_unet_inputs(channels, SD_LATENT_CHANNELS, path.name, inpainting=inpainting)
    return unet_kind(channels, SD_LATENT_CHANNELS) == INPAINTING


def _single_file_options(chosen: Family, path: Path, summary: CheckpointSummary) -> dict:
    """``from_single_file`` options: skip what protection never runs; take the EMA weights.

    An LDM training checkpoint keeps an exponential moving average of its UNet (``model_ema.*``)
    besides the trained weights. The EMA is what inference (and so a mimic) uses, and diffusers
    only takes it when told ``extract_ema``.
    """
    options: dict[str, object] = {"image_encoder": None, "feature_extractor": None}
    if chosen.is_xl:
        options["add_watermarker"] = False
    else:
        options.update(safety_checker=None, requires_safety_checker=False)
    if summary.ema == "complete":
        options["extract_ema"] = True
        warnings.warn(
            f"{path.name}: holds EMA weights of its UNet (model_ema.*) besides the trained ones; "
            "using the EMA weights, as inference does.",
            stacklevel=4,
        )
    elif summary.ema == "partial":
        warnings.warn(
            f"{path.name}: its EMA weights (model_ema.*) do not cover the whole UNet; using the "
            "trained (non-EMA) weights.",
            stacklevel=4,
        )
    return options


def _single_file_load_error(path: Path, error: Exception, origin: str | None) -> ModelLoadError:
    """One line for a single file that diffusers could not convert, and what to try.

    ``origin`` says where the configs came from (a hub repo, or the built-in ones), None when
    ``--model-config`` gave them.
    """
    if "meta tensor" in str(error):  # diffusers left weights the file lacks on the meta device
        part = _COMPONENT_NAMES.get(_module_in_traceback(error) or "", "model")
        return ModelLoadError(
            f"{path}: its {part} is missing weight tensors (they are not in the file); it may be "
            "truncated or pruned: re-download it, or use the full checkpoint."
        )
    if origin is not None:
        advice = (
            f"its configs came from {origin}; if that is the wrong family pass --family, or "
            "--model-config DIR,"
        )
    else:
        advice = "it must be a complete SD 1.x/2.x/SDXL checkpoint, and --model-config DIR"
    return ModelLoadError(
        f"{path}: could not load this checkpoint ({type(error).__name__}: {_one_line(error)}); "
        f"{advice} a diffusers folder (or hub id) of the same model family."
    )


# the component a network class is, as messages name components
_COMPONENT_NAMES = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}


def _module_in_traceback(error: BaseException) -> str | None:
    """The class of the outermost network whose method raised ``error``, e.g. "AutoencoderKL".

    diffusers converts a single file's components one after another inside one call; the
    traceback is the only place that says which of them failed.
    """
    frame = error.__traceback__
    while frame is not None:
        module = frame.tb_frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module):
            return type(module).__name__
        frame = frame.tb_next
    return None


def _declared_scheduler(config: Mapping, declared: Mapping, source: str, *, warn: bool):
    """The DDPM schedule of a single file: its configs', with what the file itself declares.

    The configs (``--model-config`` or the family's reference model) describe the architecture;
    a ``v_pred``/``ztsnr`` marker or the file's ModelSpec metadata describes this very file, so
    it wins. A disagreement with a
    ``--model-config`` the user gave (``warn``) is said, since it changes every step.
    """
    from diffusers import DDPMScheduler

    changed = {key: value for key, value in declared.items() if config.get(key) != value}
    if changed and warn:
        settings = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        warnings.warn(
            f"{source}: the file declares {settings} (its v_pred/ztsnr keys or ModelSpec "
            "metadata); using that over --model-config's scheduler config.",
            stacklevel=4,
        )
    return DDPMScheduler.from_config(config, **declared)


# every SD 1.x/2.x/SDXL VAE encodes to 4 channels; a single file's UNet is checked against it
# before its configs are fetched (and against the loaded VAE's config after)
SD_LATENT_CHANNELS = 4
# diffusers takes a checkpoint's EMA weights only when more than 100 keys are EMA ones
_EMA_MIN_KEYS = 100


@dataclass(frozen=True)
class CheckpointSummary:
    """What a single file says about itself, read before diffusers converts it.

    Attributes:
        keys: its state-dict keys (the tensors themselves are not read).
        unet_in_channels: the UNet's input channels (``conv_in``'s weight shape), None when the
            file has no such 4-d weight.
        metadata: a ``.safetensors`` file's ``__metadata__`` (SAI ModelSpec keys); {} else.
    """

    keys: frozenset[str]
    unet_in_channels: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def ema(self) -> str | None:
        """``complete`` or ``partial`` for an LDM checkpoint's ``model_ema.*`` UNet copy.

        LDM's EMA names each UNet weight without its dots (``model_ema.diffusion_model`` +
        ``input_blocks00weight``), the name diffusers' converter looks up.
        """
        if sum(key.startswith("model_ema.") for key in self.keys) <= _EMA_MIN_KEYS:
            return None
        unet = [key for key in self.keys if key.startswith("model.diffusion_model.")]
        flat = ("model_ema." + "".join(key.split(".")[1:]) for key in unet)
        return "complete" if all(key in self.keys for key in flat) else "partial"


def _read_checkpoint(path: Path) -> CheckpointSummary:
    """A single file's keys, UNet input channels and metadata, reading as little as it can.

    ``.safetensors``: the header only. ``.ckpt``: ``torch.load`` with ``weights_only=True``,
    memory-mapped where the format allows; files that also pickle Python objects (a
    PyTorch Lightning ``ModelCheckpoint`` callback, ...) are refused rather than unpickled,
    since unpickling can run any code.
    """
    from .families import UNET_INPUT_KEY

    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path, UNET_INPUT_KEY)
        checkpoint = _torch_load(path)
    except _single_file_errors() as error:
        if "Weights only load failed" in str(error):
            raise ModelLoadError(
                f"{path}: holds pickled Python objects besides the weights, which mimicshield "
                "does not load for safety; use the .safetensors release or convert the file."
            ) from error
        raise ModelLoadError(
            f"{path}: could not read this checkpoint ({type(error).__name__}: {_one_line(error)})."
        ) from error
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        return CheckpointSummary(frozenset())
    weight = checkpoint.get(UNET_INPUT_KEY)
    shape = tuple(weight.shape) if isinstance(weight, Tensor) else ()
    return CheckpointSummary(frozenset(checkpoint), _in_channels(shape))


def _read_safetensors(path: Path, unet_key: str) -> CheckpointSummary:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = frozenset(handle.keys())
        shape = tuple(handle.get_slice(unet_key).get_shape()) if unet_key in keys else ()
        metadata = dict(handle.metadata() or {})
    return CheckpointSummary(keys, _in_channels(shape), metadata)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _in_channels(conv_in_shape: tuple[int, ...]) -> int | None:
    """A convolution weight is (out, in, kh, kw); anything else tells nothing."""
    return int(conv_in_shape[1]) if len(conv_in_shape) == 4 else None


def _config_family(folder: Path) -> str | None:
    """The family a ``--model-config`` folder describes; None when it is not a local folder."""
    from .families import check_pipeline_supported, folder_family

    unet_config = folder / "unet" / "config.json"
    if not unet_config.is_file():
        return None
    model_index = _model_index(str(folder), folder, local_files_only=True)
    check_pipeline_supported(model_index, f"--model-config {folder}")
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    scheduler = (
        json.loads(scheduler_config.read_text(encoding="utf-8"))
        if scheduler_config.is_file()
        else {}
    )
    unet = json.loads(unet_config.read_text(encoding="utf-8"))
    return folder_family(model_index, unet, scheduler.get("prediction_type", "epsilon"))


def _single_file_config(path: Path, config: str, local_files_only: bool, family: Family) -> str:
    """The local folder of a ``--model-config``: the folder itself, or a hub id's snapshot.

    diffusers' ``from_single_file``, told ``local_files_only`` but finding no cached config,
    retries *online*. Resolving the folder here keeps offline runs off the network and turns a
    missing config into one clear line. Only configs and tokenizer files are fetched.
    """
    folder = Path(config).expanduser()
    if folder.is_dir():
        return str(folder)
    if looks_like_path(config):
        raise ModelLoadError(f"--model-config {config}: no such folder.")
    try:
        return _config_snapshot(config, local_files_only)
    except (OSError, ValueError) as error:
        if _is_not_found(error) and local_files_only:
            reason = f"offline, and the configs of {config!r} that describe its architecture "
            reason += "are not in the local hub cache"
        else:
            reason = f"could not get the configs of {config!r} that describe its architecture "
            reason += f"({type(error).__name__}: {_one_line(error)})"
        raise ModelLoadError(
            f"{path.name}: {reason}; pass --model-config DIR, a diffusers folder of the same model "
            f"family ({family.title}), or --family if {family.title} is the wrong guess."
        ) from error


def _family_configs(
    path: Path,
    family: Family,
    inpainting: bool,
    tokenizer_folder: Path | None,
    local_files_only: bool,
) -> tuple[AbstractContextManager[str], str]:
    """The configs of a single file without a ``--model-config`` of its own, and their origin.

    The hub's, as a user with a network gets them (the family's reference repo, or its old id
    in the cache), unless a ``--model-config`` folder gave only a tokenizer; else the built-in
    ones, with a CLIP tokenizer found on this machine. Returns a context manager that gives the
    folder while the file loads (the built-in configs are assembled in a temporary one), and
    how messages name where the configs came from.
    """
    reference = family.reference_repo(inpainting)
    hub_error = None
    if tokenizer_folder is None:
        folder, hub_error = _reference_config(local_files_only, family, inpainting)
        if folder is not None:
            return nullcontext(folder), f"{reference} ({family.title})"
    vocabulary = _builtin_vocabulary(path, family, inpainting, tokenizer_folder, local_files_only)
    origin = f"mimicshield's built-in {family.title} configs"
    if hub_error is not None and not local_files_only:  # online, a user expects the hub's: say
        warnings.warn(
            f"{path.name}: could not get the configs of {reference!r} ({type(hub_error).__name__}"
            f": {_one_line(hub_error)}); using {origin}, with the CLIP tokenizer from "
            f"{vocabulary.origin}.",
            stacklevel=4,
        )
    return _assembled_configs(family, vocabulary, inpainting), origin


def hub_errors() -> tuple[type[Exception], ...]:
    """What a hub request can raise: huggingface_hub's own errors (OSError, ValueError) and its
    HTTP client's, which huggingface_hub 2.x lets through as they are (a proxy that refuses
    the connection raises ``httpx2.ProxyError``, no OSError)."""
    errors: list[type[Exception]] = [OSError, ValueError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except (ImportError, AttributeError):  # not installed, or another API
            continue
    return tuple(errors)


def _reference_config(
    local_files_only: bool, family: Family, inpainting: bool
) -> tuple[str | None, Exception | None]:
    """The hub configs of the family's reference model (its inpainting one for ``inpainting``),
    else the same configs under an old id in the local hub cache; or None, and the hub's error.

    None sends the loader to the built-in configs.
    """
    repo_ids = family.reference_repos(inpainting)
    try:
        return _config_snapshot(repo_ids[0], local_files_only), None
    except hub_errors() as error:
        first_error = error
    for old_id in repo_ids[1:]:
        try:
            return _config_snapshot(old_id, local_files_only=True), None
        except hub_errors():
            continue
    return None, first_error


def _tokenizer_only_folder(config: str) -> Path | None:
    """A ``--model-config`` folder that holds a CLIP tokenizer and no configs, else None.

    Such a folder (``tokenizer/vocab.json`` and ``merges.txt``) completes the built-in configs,
    which have everything but the tokenizer: what the missing-tokenizer message asks for.
    """
    from .configs import vocabulary_in_folder

    folder = Path(config).expanduser()
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return None
    if (folder / "unet" / "config.json").is_file():
        return None
    return folder if vocabulary_in_folder(folder) is not None else None


def _builtin_vocabulary(
    path: Path, family: Family, inpainting: bool, folder: Path | None, local_files_only: bool
) -> Vocabulary:
    """The CLIP tokenizer files the built-in configs are completed with, or one clear line.

    From ``folder`` (a ``--model-config`` holding only a tokenizer) if given; else from the hub
    cache (the family's reference repos first, then any other CLIP tokenizer) or an installed
    ``open_clip`` (:func:`mimicshield.configs.find_vocabulary`). All CLIP text encoders of
    SD 1.x, 2.x and SDXL share one vocabulary; what differs (the pad token) is built in.
    """
    from .configs import find_vocabulary, text_vocab_size, vocabulary_in_folder
    from .families import FAMILIES

    size = text_vocab_size(family.name)
    given = vocabulary_in_folder(folder) if folder is not None else None
    if given is not None:
        problem = given.problem(size)
        if problem is not None:
            raise ModelLoadError(
                f"--model-config {folder}: not the CLIP tokenizer of {family.title} ({problem})."
            )
        return given
    repos = [*family.reference_repos(inpainting), *family.reference_repos(not inpainting)]
    for other in FAMILIES.values():
        repos += [*other.reference_repos(), *other.reference_repos(inpainting=True)]
    found = find_vocabulary(repos, size)
    if found is not None:
        return found
    repo = family.reference_repo(inpainting)
    lead = "offline, and" if local_files_only else "the hub did not give its configs, and"
    retry = "run once online" if local_files_only else "run again when the hub is reachable"
    raise ModelLoadError(
        f"{path.name}: {lead} no CLIP tokenizer for it: its {family.title} configs are built "
        "into mimicshield, its tokenizer (vocab.json and merges.txt) is not, and neither the "
        f"local hub cache ({repo!r} or another CLIP model) nor an installed open_clip has it; "
        "put the two files in FOLDER/tokenizer/ and pass --model-config FOLDER, or "
        f"{retry} so that {repo!r} is cached."
    )


@contextmanager
def _assembled_configs(family: Family, vocabulary: Vocabulary, inpainting: bool):
    """The built-in configs of ``family`` with ``vocabulary``, as a folder while loading."""
    from .configs import assembled_configs

    in_channels = 2 * SD_LATENT_CHANNELS + 1 if inpainting else None  # + mask + masked image
    with assembled_configs(family.name, vocabulary, in_channels=in_channels) as folder:
        yield folder


def _config_snapshot(repo_id: str, local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, allow_patterns=_CONFIG_PATTERNS, local_files_only=local_files_only
    )


def _single_file_errors() -> tuple[type[Exception], ...]:
    """What a bad checkpoint or config raises: I/O, conversion, unpickling, missing components."""
    import pickle

    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError

    return (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        pickle.UnpicklingError,
        SafetensorError,
        SingleFileComponentError,
    )
