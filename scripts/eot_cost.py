"""Measure the extra cost per step of ``--robust`` (EOT) for the README.

Why: each EOT step runs one transform's forward and backward pass in front of the encoder. This
times, on this machine, one encoder step (forward + backward of E(x)) with TAEF2, alone and with
each robust transform in front, interleaved and repeated, and reports medians. It also counts
the forward FLOPs of TAEF2's encoder and of the SD 1.x VAE encoder (architecture only, on the
meta device: no weights needed), so the relative overhead on SD can be judged. Usage::

    python scripts/eot_cost.py --size 256 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimicshield.robust import EOT, ROBUST_TRANSFORMS
from mimicshield.taesd import TinyAutoencoderLatents, make_encoder

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
SD_VAE_CONFIG = dict(  # SD 1.x's AutoencoderKL configuration
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


def step_seconds(model, x: torch.Tensor, eot: EOT | None) -> float:
    """One direction evaluation: forward and backward of sum(E(T(x))^2) w.r.t. x."""
    wrapped = model if eot is None else eot.wrap(model, x.shape[1:])
    x = x.detach().requires_grad_(True)
    started = time.perf_counter()
    torch.autograd.grad(wrapped.encode(x).pow(2).sum(), x)
    return time.perf_counter() - started


def transform_seconds(x: torch.Tensor, eot: EOT) -> float:
    """The transform alone: forward and backward of sum(T(x)^2) w.r.t. x."""
    transform = eot.draw(x.shape[1:])
    x = x.detach().requires_grad_(True)
    started = time.perf_counter()
    torch.autograd.grad(transform(x).pow(2).sum(), x)
    return time.perf_counter() - started


def forward_flops(module, size: int) -> int:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        module(torch.empty(1, 3, size, size))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    model = TinyAutoencoderLatents.from_dir(args.assets / "weights")
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    names = [n for n in ROBUST_TRANSFORMS if n != "none"]
    eots = {None: None, **{n: EOT([n], [0]) for n in names}}
    for eot in eots.values():  # warm-up: imports, allocator, kornia's tables
        step_seconds(model, x, eot)
    times: dict = {name: [] for name in eots}
    for _ in range(args.repeats):
        for name, eot in eots.items():
            times[name].append(step_seconds(model, x, eot))
    alone = {
        n: statistics.median(transform_seconds(x, eots[n]) for _ in range(args.repeats))
        for n in names
    }
    base = statistics.median(times[None])
    print(f"TAEF2 encoder step at {args.size}x{args.size}: {base:.2f} s (median)")
    for name in names:
        extra = statistics.median(times[name]) - base
        print(
            f"  --robust {name}: step {extra:+.2f} s ({100 * extra / base:+.0f}%); transform "
            f"alone {alone[name]:.3f} s ({100 * alone[name] / base:.0f}% of a TAEF2 step)"
        )

    from diffusers import AutoencoderKL

    with torch.device("meta"):
        sd_vae = AutoencoderKL(**SD_VAE_CONFIG)
        taef2_encoder = make_encoder()
    taef2 = forward_flops(taef2_encoder, args.size)
    sd = forward_flops(lambda x: sd_vae.encode(x).latent_dist.mean, args.size)
    print(
        f"encoder forward GFLOPs at {args.size}: TAEF2 {taef2 / 1e9:.1f}, SD VAE {sd / 1e9:.1f} "
        f"({sd / taef2:.1f}x)"
    )


if __name__ == "__main__":
    main()
