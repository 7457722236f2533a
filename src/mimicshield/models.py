"""Loading Stable Diffusion components and the one adapter the protection maths talks to.

Every diffusers object stays behind :class:`LatentDiffusion` (in the spirit of k-diffusion's
``external.py``): the methods in :mod:`mimicshield.methods` only call ``encode``,
``predict_noise`` and read ``alphas_cumprod``. The adapter applies the VAE's own
``scaling_factor`` and makes "posterior sample versus posterior mean" an explicit argument.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it in one line."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is of a kind whose maths this version does not implement."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA that supports it, fp16 on other CUDA and on MPS, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def vae_dtype_for(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The SD VAE overflows in fp16 (its config says ``force_upcast``): run it in fp32 then."""
    if dtype == torch.float16 and force_upcast:
        return torch.float32
    return dtype


@dataclass
class LatentDiffusion:
    """The VAE encoder, UNet, text encoder and noise schedule of one latent diffusion model.

    Notation (name here -> paper): ``encode(x)`` -> E(x), ``predict_noise`` -> eps_theta,
    ``alphas_cumprod[t]`` -> abar_t.
    """

    vae: torch.nn.Module
    unet: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    alphas_cumprod: Tensor
    scaling_factor: float
    prediction_type: str = "epsilon"
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    _prompt_cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of E(x) for an image of ``height`` x ``width`` pixels."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, height // factor, width // factor)

    def encode(self, x: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        """E(x) = scaling_factor * (mean + std * posterior_noise); the mean when noise is None.

        ``x`` is in [-1, 1]. Gradients flow back to ``x``; the result is fp32.
        """
        dist = self.vae.encode(x.to(self.vae_dtype)).latent_dist
        latent = dist.mean if posterior_noise is None else dist.mean + dist.std * posterior_noise
        return self.scaling_factor * latent.float()

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_theta(z_t, t, c) in fp32; v-prediction models are refused at load time."""
        if self.unet is None:
            raise RuntimeError("This model was loaded without a UNet; semantic methods need one.")
        out = self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        return out.float()

    @torch.no_grad()
    def embed_prompt(self, prompt: str) -> Tensor:
        """c = text_encoder(tokenize(prompt)), computed once per prompt and cached."""
        if prompt in self._prompt_cache:
            return self._prompt_cache[prompt]
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("The text encoder was released; embed every prompt before releasing.")
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        embedding = self.text_encoder(tokens)[0].to(self.dtype)
        self._prompt_cache[prompt] = embedding
        return embedding

    def release_text_encoder(self) -> None:
        """Free the text encoder's memory once every prompt is embedded."""
        self.text_encoder = None


def _load_error(source: str, cause: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load model {source!r} ({type(cause).__name__}): it is not a local folder or "
        "file, and the hub could not provide it. Offline, pass a local diffusers folder or a "
        ".safetensors/.ckpt file with --model PATH."
    )


def _check_supported(prediction_type: str, source: str) -> None:
    if prediction_type != "epsilon":
        raise UnsupportedModelError(
            f"Model {source!r} uses prediction_type={prediction_type!r}; this version supports "
            "epsilon-prediction checkpoints (SD 1.x, SD 2.x-base) only."
        )


def load_models(
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    with_decoder: bool = False,
    single_file_config: str | None = None,
    local_files_only: bool | None = None,
) -> LatentDiffusion:
    """Load what the protection methods need: the VAE encoder, UNet, text encoder and schedule.

    Args:
        source: a hub id, a local diffusers folder, or a single ``.safetensors``/``.ckpt`` file.
        device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        dtype: ``auto``, ``fp32``, ``fp16`` or ``bf16``; the VAE stays fp32 where fp16 overflows.
        with_decoder: keep the VAE decoder (for mimicry simulations); dropped otherwise.
        single_file_config: for a single file, a diffusers folder (or hub id) whose configs and
            tokenizer describe the checkpoint's architecture. Without it diffusers fetches one.
        local_files_only: never touch the network; defaults to ``HF_HUB_OFFLINE``.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")

    path = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES
    if looks_like_path and not path.exists():
        raise ModelLoadError(f"{source}: no such model folder or checkpoint file.")
    with _quiet_loading():
        if path.suffix in SINGLE_FILE_SUFFIXES:
            components = _load_single_file(path, single_file_config, local_files_only)
        else:
            components = _load_diffusers_folder(source, local_files_only)
        vae, unet, text_encoder, tokenizer, scheduler = components

        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        _check_supported(prediction_type, source)
        if not with_decoder:
            vae.decoder = None  # the methods only encode; this saves a third of the VAE's memory
            vae.post_quant_conv = None

        vae_dtype = vae_dtype_for(torch_dtype, bool(vae.config.get("force_upcast", False)))
        for module, module_dtype in (
            (vae, vae_dtype),
            (unet, torch_dtype),
            (text_encoder, torch_dtype),
        ):
            module.to(device=torch_device, dtype=module_dtype)
            module.requires_grad_(False)
            module.eval()

    return LatentDiffusion(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        alphas_cumprod=scheduler.alphas_cumprod.to(device=torch_device, dtype=torch.float32),
        scaling_factor=float(vae.config.scaling_factor),
        prediction_type=prediction_type,
        name=str(source),
        device=torch_device,
        dtype=torch_dtype,
        vae_dtype=vae_dtype,
    )


@contextmanager
def _quiet_loading():
    """Silence per-weight progress bars and dtype notices while loading; errors still raise."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging, hub_logging)
    levels = [logger.get_verbosity() for logger in loggers]
    for logger in loggers:
        logger.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.set_verbosity(level)
        transformers_logging.enable_progress_bar()


def _load_diffusers_folder(source: str, local_files_only: bool):
    """Load each component on its own, so the safety checker and feature extractor never load."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"local_files_only": local_files_only}
    try:
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(source, error) from error
    return vae, unet, text_encoder, tokenizer, scheduler


def _load_single_file(path: Path, config: str | None, local_files_only: bool):
    """Load an original-format checkpoint through diffusers' own converter.

    diffusers reads the architecture from ``config`` (a diffusers folder or hub id); without it,
    it guesses a hub id from the checkpoint's keys and downloads that config, which fails offline.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path}: could not read this checkpoint ({type(error).__name__}: {error}). Offline, "
            "also pass --model-config DIR, a diffusers folder of the same model family."
        ) from error
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler
