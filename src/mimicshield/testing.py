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
    vocab_size = len(json.loads(_vocab(folder).read_text()))
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


def save_tiny_inpainting_model(folder: str | Path, *, seed: int = 0) -> Path:
    """The tiny model with a 9-channel UNet (latents, mask, masked-image latents), as SD-inpaint."""
    from diffusers import UNet2DConditionModel

    folder = save_tiny_stable_diffusion(folder, seed=seed)
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
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
        path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))
    return folder


def save_tiny_single_file(diffusers_folder: str | Path, path: str | Path) -> Path:
    """Re-save a diffusers folder as one original-layout (CompVis/LDM) ``.safetensors``/``.ckpt``.

    This is the inverse of diffusers' single-file converter for the layers the tiny SD-1.x config
    has, so the single-file loading path is tested on the key layout real checkpoints use. A
    ``.ckpt`` is written as ``torch.save({"state_dict": ...})``, like the original releases.
    """
    from safetensors.torch import load_file, save_file

    folder, path = Path(diffusers_folder), Path(path)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")

    state_dict = {}
    for key, value in unet.items():
        state_dict["model.diffusion_model." + _unet_key_to_ldm(key, unet_config)] = value
    for key, value in vae.items():
        ldm_key = _vae_key_to_ldm(key, len(vae_config["block_out_channels"]))
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convs
        state_dict["first_stage_model." + ldm_key] = value
    for key, value in text.items():
        # transformers >= 5.6 saves CLIPTextModel without its ``text_model.`` wrapper
        key = key if key.startswith("text_model.") else "text_model." + key
        state_dict["cond_stage_model.transformer." + key] = value

    state_dict = {key: value.contiguous().clone() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
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
