"""What a protection step keeps in memory, counted exactly on the meta device (no GPU needed).

The bytes of the networks' weights, and the activations autograd saves for the VAE encoder's
backward pass, for the full-size SD 1.x architecture at a given size, dtype and batch. Meta
tensors carry shapes and dtypes but no data, so this runs in seconds anywhere and does not
depend on the device; a GPU's measured peak adds its allocator's caching and workspaces, and
the short-lived tensors of the UNet forward and of the backward pass itself.

python scripts/backward_memory.py --res 512 --batch 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import logging

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from mimicshield.bench import architecture
from mimicshield.performance import (
    fuse_group_norm_silu,
    parameter_bytes,
    saved_tensor_bytes,
    stop_saving_frozen_conv_inputs,
)

GIB = 2**30
SD1 = architecture()  # the full-size SD v1.x networks
SD1_UNET, SD1_VAE, SD1_TEXT = SD1.unet, SD1.vae, SD1.text
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def encoder(
    dtype: torch.dtype, *, frozen_convs: bool, checkpointing: bool, fused_norm: bool = False
) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(**SD1_VAE).to(dtype)
    vae.decoder = vae.post_quant_conv = None
    vae.requires_grad_(False)
    if frozen_convs:
        stop_saving_frozen_conv_inputs(vae)
    if fused_norm:
        fuse_group_norm_silu(vae.encoder)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


def meta_input(batch: int, channels: int, res: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(batch, channels, res, res, device="meta", dtype=dtype, requires_grad=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    logging.disable(logging.WARNING)  # diffusers' note about casting with to()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD1_TEXT)).to(dtype)
    plain = encoder(dtype, frozen_convs=False, checkpointing=False)
    print(f"SD 1.x, {args.res} px, batch {args.batch}, {args.dtype}")
    print(
        f"weights: UNet {parameter_bytes(unet) / GIB:.3f} GiB, VAE encoder "
        f"{parameter_bytes(plain) / GIB:.3f} GiB, text encoder "
        f"{parameter_bytes(text_encoder) / GIB:.3f} GiB"
    )
    print("activations saved for the encoder backward:")
    x = meta_input(args.batch, 3, args.res, dtype)
    settings = [(False, False, False), (False, True, False), (True, False, False)]
    settings += [(True, True, False), (True, False, True), (True, True, True)]
    for frozen_convs, checkpointing, fused_norm in settings:
        vae = encoder(
            dtype, frozen_convs=frozen_convs, checkpointing=checkpointing, fused_norm=fused_norm
        )
        saved = saved_tensor_bytes(vae.encode, x)
        print(
            f"  frozen convolutions {frozen_convs!s:5}  checkpointing {checkpointing!s:5}"
            f"  GroupNorm+SiLU fused {fused_norm!s:5}  {saved / GIB:.3f} GiB"
        )
    # With checkpointing, the backward pass re-runs one block at a time: the largest, the first,
    # sets the peak.
    hidden = meta_input(args.batch, SD1_VAE["block_out_channels"][0], args.res, dtype)
    for frozen_convs, fused_norm in ((False, False), (True, False), (True, True)):
        vae = encoder(dtype, frozen_convs=frozen_convs, checkpointing=False, fused_norm=fused_norm)
        saved = saved_tensor_bytes(vae.encoder.down_blocks[0], hidden)
        print(
            f"  the first block, re-run under checkpointing, frozen convolutions "
            f"{frozen_convs!s:5}  GroupNorm+SiLU fused {fused_norm!s:5}  {saved / GIB:.3f} GiB"
        )


if __name__ == "__main__":
    main()
