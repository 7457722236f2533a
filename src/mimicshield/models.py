"""Loading Stable Diffusion components and the one adapter the protection maths talks to.

Every diffusers object stays behind :class:`LatentDiffusion` (in the spirit of k-diffusion's
``external.py``): the methods in :mod:`mimicshield.methods` only call ``encode``,
``predict_noise`` and read ``alphas_cumprod``. The adapter applies the VAE's own
``scaling_factor`` and makes "posterior sample versus posterior mean" an explicit argument.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .mps import check_mps_dtype

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it in one line."""


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


def _cuda_supports_bf16() -> bool:
    """Native bf16 only: pre-Ampere GPUs report bf16 "supported" through slow emulation."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no ``including_emulation`` and never counts emulation
        return torch.cuda.is_bf16_supported()


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
    name = str(dtype).lower().removeprefix("torch.")
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"`dtype` must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_supports_bf16() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def vae_dtype_for(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The SD VAE overflows in fp16 (its config says ``force_upcast``): run it in fp32 then.

    bf16 has fp32's exponent range, so it never needs the upcast.
    """
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
            raise RuntimeError(
                "The text encoder was released; embed every prompt before releasing."
            )
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


_LOCAL_PATH_HINT = "pass a local diffusers folder or a .safetensors/.ckpt file with --model PATH"


def _one_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message: hub and torch errors run to several lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_error(source: str, cause: Exception, local_files_only: bool) -> ModelLoadError:
    if local_files_only:
        return ModelLoadError(
            f"Model {source!r} is not a local folder and not in the local hub cache, and downloads "
            f"are off (offline); {_LOCAL_PATH_HINT}."
        )
    return ModelLoadError(
        f"Could not get model {source!r} from the Hugging Face hub ({type(cause).__name__}: "
        f"{_one_line(cause)}); check the id, or {_LOCAL_PATH_HINT}."
    )


def _check_supported(prediction_type: str, source: str, hint: str = "") -> None:
    """Refuse what the maths does not cover: every method here assumes eps_theta.

    A v- or x0-prediction UNet would need its output converted to eps first (planned, not done).
    """
    if prediction_type != "epsilon":
        raise UnsupportedModelError(
            f"Model {source!r} uses prediction_type={prediction_type!r}; this version supports "
            f"epsilon-prediction checkpoints (SD 1.x, SD 2.x-base) only.{hint}"
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
            tokenizer describe the checkpoint's architecture, VAE scale and scheduler. Without it
            diffusers infers the family from the keys and fetches its configs (offline: only
            from the local hub cache).
        local_files_only: never touch the network; defaults to ``HF_HUB_OFFLINE``.
    """
    torch_device = resolve_device(device)
    torch_dtype = check_mps_dtype(resolve_dtype(dtype, torch_device), torch_device)
    if local_files_only is None:
        # the same truthy spellings huggingface_hub accepts for HF_HUB_OFFLINE
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
        local_files_only = offline in ("1", "ON", "YES", "TRUE")

    source = str(source)
    path = Path(source).expanduser()
    if not path.exists() and _looks_like_path(source):
        raise ModelLoadError(f"{source}: no such model folder or checkpoint file.")
    if path.is_file() and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{source}: not a model; --model takes a hub id, a diffusers folder, or a "
            ".safetensors/.ckpt checkpoint."
        )
    with _quiet_loading():
        if path.is_file():
            components = _load_single_file(path, single_file_config, local_files_only)
        else:
            components = _load_diffusers_folder(source, local_files_only)
        vae, unet, text_encoder, tokenizer, scheduler = components

        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        hint = ""
        if path.is_file() and single_file_config is None:
            hint = (
                " The scheduler config was guessed from the checkpoint's keys; if it is an "
                "epsilon model (e.g. SD 2.x-base), pass --model-config with its diffusers config."
            )
        _check_supported(prediction_type, source, hint)
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

    # abar_t follows the checkpoint's own schedule (betas, num_train_timesteps). The scheduler's
    # timestep_spacing only places *inference* steps; training-style t ~ U{0..T-1}, as the
    # methods sample it, reads alphas_cumprod directly and never depends on it.
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


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that looks like a path is one."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix in SINGLE_FILE_SUFFIXES
    )


def _load_diffusers_folder(source: str, local_files_only: bool):
    """Load each component on its own, so the safety checker and feature extractor never load.

    For a hub id only these five subfolders are downloaded, never the safety checker's weights.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(source).expanduser()
    is_local = folder.is_dir()
    if is_local:
        missing = [name for name in _COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{source}: not a Stable Diffusion diffusers folder (no {', '.join(missing)} "
                "subfolder); pass one saved with save_pretrained, or a .safetensors/.ckpt file."
            )
        source = str(folder)
    loaders = {
        "scheduler": DDPMScheduler,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
    }
    loaded = {}
    for name, cls in loaders.items():
        try:
            loaded[name] = cls.from_pretrained(
                source, subfolder=name, local_files_only=local_files_only
            )
        except (OSError, ValueError) as error:
            if is_local:
                raise ModelLoadError(
                    f"{source}: could not load its {name} ({type(error).__name__}: "
                    f"{_one_line(error)})."
                ) from error
            raise _load_error(source, error, local_files_only) from error
    return tuple(loaded[name] for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))


def _load_single_file(path: Path, config: str | None, local_files_only: bool):
    """Load an original-format (CompVis/LDM) checkpoint through diffusers' own converter.

    The file holds weights only. The architecture, the VAE's ``scaling_factor`` and
    ``force_upcast``, the tokenizer and the scheduler (so ``prediction_type``) come from
    ``config``, a diffusers folder or hub id. Without one diffusers guesses a hub id from the keys
    (SD 2.x maps to the v-prediction 2.1) and downloads its configs: impossible offline.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    config = _single_file_config(path, config, local_files_only)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            local_files_only=local_files_only,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    except _single_file_errors() as error:
        if config is None:
            advice = "without --model-config DIR its configs come from the hub; pass DIR,"
        else:
            advice = "it must be a complete SD 1.x/2.x checkpoint, and --model-config DIR"
        raise ModelLoadError(
            f"{path}: could not load this checkpoint ({type(error).__name__}: {_one_line(error)}); "
            f"{advice} a diffusers folder (or hub id) of the same model family."
        ) from error
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler


def _single_file_config(path: Path, config: str | None, local_files_only: bool) -> str | None:
    """Where diffusers should read a single file's configs from; offline, always a local folder.

    diffusers' ``from_single_file``, told ``local_files_only`` but finding no cached config,
    retries *online*. Resolving the folder here keeps offline runs off the network and turns a
    missing config into one clear line.
    """
    if config is not None:
        folder = Path(config).expanduser()
        if folder.is_dir():
            return str(folder)
        if _looks_like_path(config):
            raise ModelLoadError(f"--model-config {config}: no such folder.")
        if not local_files_only:
            return config
        repo_id = config
    elif not local_files_only:
        return None  # diffusers infers the family from the keys and downloads its configs
    else:
        repo_id = _inferred_config_repo(path)

    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=_CONFIG_PATTERNS, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path.name}: offline, and the configs of {repo_id!r} that describe its architecture "
            "are not in the local hub cache; pass --model-config DIR, a diffusers folder of the "
            "same model family (e.g. a saved stable-diffusion-v1-5)."
        ) from error


def _inferred_config_repo(path: Path) -> str:
    """The hub id whose configs diffusers would use for this checkpoint, read from its keys.

    This reads the file once more than loading does; it only happens offline without a config.
    """
    from diffusers.loaders.single_file_utils import (
        fetch_diffusers_config,
        load_single_file_checkpoint,
    )

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        return fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except _single_file_errors() as error:
        raise ModelLoadError(
            f"{path}: could not read this checkpoint ({type(error).__name__}: {_one_line(error)})."
        ) from error


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
