"""Which Stable Diffusion family a checkpoint is, read from its own files, and what is refused.

The family decides what the adapter needs besides the VAE and the UNet: SDXL has two text
encoders, a pooled embedding and size "time ids"; SD 2.x comes as 512-base (epsilon) and 768-v
(v-prediction), which a single file cannot tell apart. Detection reads, in this order of trust:
the diffusers ``model_index.json`` class name, the UNet config, and for single files the
original-layout key names (the text encoder's prefix tells SD 1.x, SD 2.x and SDXL apart).

Diffusion transformers and flow-matching models (SD3, FLUX, PixArt, ...) use neither a UNet nor
the DDPM noise schedule the methods are written for: they are refused with a clear error.
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
            ``--model-config`` (architecture, VAE scale, tokenizers, scheduler).
        prediction_type: forced by ``--family``; None lets the scheduler config decide.
        text_encoders: 2 for SDXL (hidden states concatenated, pooled embedding, time ids).
    """

    name: str
    title: str
    pipeline: str
    config_repo: str
    prediction_type: str | None = None
    text_encoders: int = 1

    @property
    def is_xl(self) -> bool:
        return self.text_encoders == 2


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            "SD 1.x",
            "StableDiffusionPipeline",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
        Family(
            "sd2-base",
            "SD 2.x-base",
            "StableDiffusionPipeline",
            "stabilityai/stable-diffusion-2-1-base",
            prediction_type="epsilon",
        ),
        Family(
            "sd2-v",
            "SD 2.x (768-v)",
            "StableDiffusionPipeline",
            "stabilityai/stable-diffusion-2-1",
            prediction_type="v_prediction",
        ),
        Family(
            "sdxl",
            "SDXL",
            "StableDiffusionXLPipeline",
            "stabilityai/stable-diffusion-xl-base-1.0",
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
_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


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
    first_text_encoder = (model_index.get("text_encoder") or [None])[0]
    if model_index.get("requires_aesthetics_score") or (
        "XL" in class_name and not first_text_encoder
    ):
        _refuse_refiner(source)


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
    if _UNET_KEY not in keys:
        for fragment, title in _TRANSFORMER_KEYS.items():
            if any(fragment in key for key in keys):
                raise UnsupportedModelError(
                    f"{source} looks like a {title} checkpoint: {NOT_YET_SUPPORTED}."
                )
        raise ModelLoadError(
            f"{source}: no Stable Diffusion UNet in this checkpoint (no {_UNET_KEY}); pass a full "
            f"SD 1.x/2.x/SDXL checkpoint ({NOT_YET_SUPPORTED})."
        )
    if any(key.startswith("conditioner.embedders.1.model.") for key in keys):
        return "sdxl"
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        _refuse_refiner(source)
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2-v"
    return "sd1"


def checkpoint_schedule(keys: Iterable[str], source: str) -> dict[str, object]:
    """Scheduler settings a single file declares with marker keys, as ComfyUI writes them.

    Original-layout files carry no scheduler config, so v-prediction and zero-terminal-SNR
    fine-tunes (e.g. NoobAI-XL v-pred) mark themselves with empty ``v_pred`` and ``ztsnr``
    tensors; diffusers ignores them and would read such a file as epsilon. Zero-SNR
    schedules place their steps "trailing", so the last one reaches abar_T = 0. EDM files
    (``edm_mean``/``edm_std``: Playground v2.5; ``edm_vpred.sigma_max``: CosXL) are refused,
    as their diffusers folders are.
    """
    keys = set(keys)
    if {"edm_mean", "edm_std"} <= keys or "edm_vpred.sigma_max" in keys:
        raise UnsupportedModelError(
            f"{source} uses the EDM formulation (its edm_* keys, e.g. Playground v2.5 or CosXL), "
            "not the DDPM schedule the methods are written for; use an SD 1.x, SD 2.x or SDXL "
            "checkpoint."
        )
    if "v_pred" not in keys:
        return {}
    settings: dict[str, object] = {"prediction_type": "v_prediction"}
    if "ztsnr" in keys:
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return settings


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


def _refuse_refiner(source: str) -> None:
    raise UnsupportedModelError(
        f"{source} is an SDXL refiner (one text encoder, aesthetic-score conditioning); protect "
        "against the SDXL base model instead."
    )
