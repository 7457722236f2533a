"""Tiny Stable Diffusion models with random weights, saved in the diffusers layout.

Used by the test suite and for offline demos: the files go through exactly the loader a user's
checkpoint goes through. Random weights prove plumbing and maths, never protection quality.
"""

from __future__ import annotations

import json
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


def _vocab(folder: Path) -> Path:
    return folder / "tokenizer" / "vocab.json"
