"""Tiny Stable Diffusion models with random weights, saved in the diffusers layout.

Used by the test suite and for offline demos: the files go through exactly the loader a user's
checkpoint goes through. Random weights prove plumbing and maths, never protection quality.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import torch

TINY_UNET = {
    "sample_size": 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
SD1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
# SD 2.x: OpenCLIP-H text encoder (gelu), linear attention projections in the UNet
TINY_SD2_UNET = {**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}
TINY_SD2_TEXT = {**TINY_TEXT, "hidden_act": "gelu"}
# SDXL: CLIP-L + OpenCLIP-bigG (different widths, as in the real model: the single-file
# converter tells the two apart by width), cross-attention on both concatenated (32 + 48), and
# added conditioning of 6 time ids x 8 + the 48-wide pooled embedding
TINY_SDXL_TEXT_2 = {
    **TINY_TEXT,
    "hidden_size": 48,
    "intermediate_size": 96,
    "projection_dim": 48,
    "hidden_act": "gelu",
}
TINY_SDXL_UNET = {
    **TINY_UNET,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 32 + 48,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,
}
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025}
SDXL_SCHEDULER = {**SD1_SCHEDULER, "interpolation_type": "linear", "use_karras_sigmas": False}


def write_tiny_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary: enough to tokenise any ASCII prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    config["unk_token"] = config["pad_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def save_tiny_stable_diffusion(
    folder: str | Path, *, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Build a tiny SD-1.x-shaped model with random weights and ``save_pretrained`` it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    write_tiny_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads(_vocab(folder).read_text(encoding="utf-8")))
    special = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 1}
    text_config = CLIPTextConfig(vocab_size=vocab_size, **special, **TINY_TEXT)
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    scheduler = DDPMScheduler(**{**SD1_SCHEDULER, "prediction_type": prediction_type})
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def save_tiny_inpainting_model(folder: str | Path, *, seed: int = 0, family: str = "sd1") -> Path:
    """The tiny model of ``family`` with a 9-channel UNet (latents, mask, masked-image latents).

    Saved as the family's inpainting pipeline, the way SD-inpainting, SD 2 inpainting and the
    SDXL inpainting 0.1 model are: SD 2.x inpainting is 512 px epsilon, whatever 2.x it is.
    """
    from diffusers import UNet2DConditionModel

    prediction_type = "epsilon" if family.startswith("sd2") else None
    folder = save_tiny_family_model(folder, family, seed=seed, prediction_type=prediction_type)
    unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**{**unet_config, "in_channels": 9}).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    xl = family == "sdxl"
    index["_class_name"] = f"StableDiffusion{'XL' if xl else ''}InpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _vocab(folder: Path) -> Path:
    return folder / "tokenizer" / "vocab.json"


def copy_tiny_model(
    source: str | Path, folder: str | Path, *, weights: bool = True, **config_updates: dict
) -> Path:
    """Copy a saved diffusers folder, editing configs: ``vae={"scaling_factor": 0.5}``, ...

    With ``weights=False`` only configs and tokenizer files are copied: that is what a
    ``--model-config`` folder for a single-file checkpoint holds, and it proves the weights then
    come from the checkpoint and nowhere else.
    """
    source, folder = Path(source), Path(folder)
    for file in source.rglob("*"):
        if file.is_dir() or (not weights and file.suffix not in (".json", ".txt")):
            continue
        target = folder / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    for component, updates in config_updates.items():
        if component == "model_index":
            path = folder / "model_index.json"
        elif component == "scheduler":
            path = folder / component / "scheduler_config.json"
        else:
            path = folder / component / "config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text(encoding="utf-8")), **updates}, indent=2)
        )
    return folder


def save_tiny_single_file(
    diffusers_folder: str | Path, path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Re-save a diffusers folder as one original-layout (CompVis/LDM) ``.safetensors``/``.ckpt``.

    This is the inverse of diffusers' single-file converter for the layers the tiny configs
    have, so the single-file loading path is tested on the key layout real checkpoints use. A
    ``.ckpt`` is written as ``torch.save({"state_dict": ...})``, like the original releases.
    The text encoders follow the family: CLIP for SD 1.x, OpenCLIP (``cond_stage_model.model``)
    for SD 2.x, and SDXL's ``conditioner.embedders`` pair. ``metadata`` goes into a
    ``.safetensors`` header (e.g. SAI ModelSpec keys).
    """
    from safetensors.torch import load_file, save_file

    folder, path = Path(diffusers_folder), Path(path)
    unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))

    state_dict = {}
    for key, value in unet.items():
        state_dict["model.diffusion_model." + _unet_key_to_ldm(key, unet_config)] = value
    for key, value in vae.items():
        ldm_key = _vae_key_to_ldm(key, len(vae_config["block_out_channels"]))
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convs
        state_dict["first_stage_model." + ldm_key] = value
    if (folder / "text_encoder_2").is_dir():  # SDXL: CLIP-L as is, OpenCLIP-bigG converted
        text_2 = load_file(folder / "text_encoder_2" / "model.safetensors")
        state_dict.update(_clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        state_dict.update(_open_clip_to_ldm(text_2, "conditioner.embedders.1.model."))
    elif text_config.get("hidden_act") == "gelu":  # SD 2.x: an OpenCLIP model
        state_dict.update(_open_clip_to_ldm(text, "cond_stage_model.model."))
    else:
        state_dict.update(_clip_to_ldm(text, "cond_stage_model.transformer."))

    state_dict = {key: value.contiguous().clone() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state_dict, path, metadata=metadata)
    else:
        torch.save({"state_dict": state_dict}, path)
    return path


_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_LDM_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and time-id embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_LDM_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet_to_ldm(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_LDM_RESNET[layer]}.{param}"


def _unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers UNet2DConditionModel key in the original ``input_blocks``/... layout.

    LDM numbers the blocks flat: ``input_blocks.0`` is ``conv_in``, then each down block holds
    ``layers_per_block`` (resnet, attention) pairs and one downsampler; each up block holds
    ``layers_per_block + 1`` pairs and ends with its upsampler. Transformer internals match.
    """
    per_block = config["layers_per_block"]
    module, _, param = key.rpartition(".")
    if module in _LDM_UNET_TOP:
        return f"{_LDM_UNET_TOP[module]}.{param}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * (per_block + 1) + layer
        return _pair_to_ldm("input_blocks", index, kind, rest)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        index = 1 + int(match[1]) * (per_block + 1) + per_block
        return f"input_blocks.{index}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet_to_ldm(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return _pair_to_ldm("output_blocks", block * (per_block + 1) + layer, kind, rest)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(match[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{match[2]}"
    raise KeyError(f"no original-layout name for UNet key {key!r} (extend _unet_key_to_ldm)")


def _pair_to_ldm(blocks: str, index: int, kind: str, rest: str) -> str:
    if kind == "resnets":
        return f"{blocks}.{index}.0.{_resnet_to_ldm(rest)}"
    return f"{blocks}.{index}.1.{rest}"


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key in the original layout (``decoder.up`` counts down)."""
    key = key.replace("conv_norm_out", "norm_out")
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        rest = match[3].replace("conv_shortcut", "nin_shortcut")
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{rest}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        return f"{match[1]}.mid.attn_1.{_LDM_VAE_ATTENTION[match[2]]}.{match[3]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = match[3].replace("conv_shortcut", "nin_shortcut")
        return f"encoder.down.{match[1]}.block.{match[2]}.{rest}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = match[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.block.{match[2]}.{rest}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.upsample.{match[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.\w+", key):
        return key
    if re.fullmatch(r"(post_)?quant_conv\.\w+", key):
        return key
    raise KeyError(f"no original-layout name for VAE key {key!r} (extend _vae_key_to_ldm)")


def _clip_to_ldm(text: dict, prefix: str) -> dict:
    """transformers CLIP text weights under ``prefix``, always inside ``text_model.``.

    transformers >= 5.6 saves CLIPTextModel without its ``text_model.`` wrapper.
    """
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in text.items()
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _open_clip_to_ldm(text: dict, prefix: str) -> dict:
    """transformers CLIP text weights in the OpenCLIP layout SD 2.x and SDXL files use.

    OpenCLIP keeps q, k and v in one ``in_proj`` matrix and stores the projection transposed.
    """
    out, qkv = {}, {}
    for key, value in text.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(\w+)", key):
            out[f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, param), parts in qkv.items():
        in_proj = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = in_proj
    return {prefix + key: value for key, value in out.items()}


def save_tiny_family_model(
    folder: str | Path, family: str, *, seed: int = 0, prediction_type: str | None = None
) -> Path:
    """A tiny model of ``family`` (``sd1``, ``sd2-base``, ``sd2-v``, ``sdxl``), saved as a pipeline.

    The configs are the real ones with small widths: SD 2.x's OpenCLIP text encoder and linear
    attention projections, SDXL's two text encoders, added conditioning, 0.13025 VAE scale and
    Euler scheduler. ``sd2-v`` defaults to v-prediction; ``prediction_type`` overrides.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family == "sd1":
        return save_tiny_stable_diffusion(
            folder, seed=seed, prediction_type=prediction_type or "epsilon"
        )
    folder = Path(folder)
    xl = family == "sdxl"
    prediction_type = prediction_type or ("v_prediction" if family == "sd2-v" else "epsilon")
    torch.manual_seed(seed)
    UNet2DConditionModel(**(TINY_SDXL_UNET if xl else TINY_SD2_UNET)).save_pretrained(
        folder / "unet"
    )
    AutoencoderKL(**(TINY_SDXL_VAE if xl else TINY_VAE)).save_pretrained(folder / "vae")
    encoders = [("", CLIPTextModel, TINY_TEXT if xl else TINY_SD2_TEXT)]
    if xl:
        encoders.append(("_2", CLIPTextModelWithProjection, TINY_SDXL_TEXT_2))
    for suffix, cls, config in encoders:
        write_tiny_tokenizer(folder / f"tokenizer{suffix}")
        vocab_size = len(
            json.loads((folder / f"tokenizer{suffix}" / "vocab.json").read_text(encoding="utf-8"))
        )
        special = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1}
        text_config = CLIPTextConfig(vocab_size=vocab_size, pad_token_id=1, **special, **config)
        cls(text_config).save_pretrained(folder / f"text_encoder{suffix}")
    if xl:  # the real SDXL's second tokenizer pads with "!", not with the end token
        path = folder / "tokenizer_2" / "tokenizer_config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text(encoding="utf-8")), "pad_token": "!"})
        )
    scheduler_cls = EulerDiscreteScheduler if xl else DDPMScheduler
    scheduler_config = {
        **(SDXL_SCHEDULER if xl else SD1_SCHEDULER),
        "prediction_type": prediction_type,
    }
    scheduler_cls.from_config(scheduler_config).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_cls.__name__],
    }
    if xl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
