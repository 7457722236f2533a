"""Regenerate the README's robustness table: how much protection survives each purification.

Why: attackers JPEG, resize or filter an image before mimicking it. This measures, on the real
TAEF2 encoder (``../shared/assets/weights``) and real images (``../shared/assets/images``), the
surviving latent distortion of every purification in :mod:`mimicshield.purify`

    s = ||E(p(x_adv)) - E(p(x0))|| / ||E(x_adv) - E(x0)||

for photoguard protections computed with and without EOT (``--robust``). TAEF2 is a distilled
stand-in for the SD VAE encoder, not SD itself: the VAE round trip uses TAEF2's own decoder, and
SDEdit does not apply (TAEF2 has no UNet). Each image is resized so its shorter side is
``--size`` and centre-cropped to a square; the protection is quantised to 8 bits as a saved file
is. Usage (about 10 minutes on a busy 2-core CPU with the defaults)::

    python scripts/robustness_table.py
    python scripts/robustness_table.py --size 128 --steps 10 --json table.json   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from mimicshield.images import load_image
from mimicshield.metrics import psnr
from mimicshield.protector import Protector
from mimicshield.purify import PURIFICATIONS, latent_distance, resize
from mimicshield.taesd import TinyAutoencoderLatents

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
DEFAULT_IMAGES = ("portrait/astronaut_eileen_collins.png", "artwork/vangogh_sunflowers_1888.png")
DEFAULT_ROBUST = ("", "jpeg", "jpeg,resize,blur,noise")


def square_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): shorter side to ``size``, then the centre square."""
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    x = resize(x[None], shape).clamp(0, 1)[0]
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return x[:, top : top + size, left : left + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=16, help="L-inf budget in 1/255 units")
    parser.add_argument("--step-size", type=float, default=2, help="in 1/255 units")
    parser.add_argument(
        "--robust",
        nargs="+",
        default=list(DEFAULT_ROBUST),
        help="one protection per entry; '' is plain photoguard",
    )
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = TinyAutoencoderLatents.from_dir(args.assets / "weights")
    clean = torch.stack(
        [
            square_crop(load_image(args.assets / "images" / name).rgb, args.size)
            for name in args.images
        ]
    )
    purifications = [p for p in PURIFICATIONS.values() if p.applicable(model)]
    results: dict[str, dict] = {}
    for robust in args.robust:
        protector = Protector(
            model,
            "photoguard",
            eps=args.eps / 255,
            step_size=args.step_size / 255,
            steps=args.steps,
            robust=robust.split(",") if robust else (),
        )
        started = time.perf_counter()
        protected = torch.cat([protector(image[None]) for image in clean])
        seconds_per_step = (time.perf_counter() - started) / (args.steps * len(clean))
        before = latent_distance(model, protected, clean)
        surviving, after = {}, {}
        for p in purifications:
            apply = partial(p, model=model)
            distance = latent_distance(model, apply(protected), apply(clean))
            surviving[p.name] = (distance / before).mean().item()
            after[p.name] = distance.mean().item()
        label = f"--robust {robust}" if robust else "plain"
        results[label] = {
            "seconds_per_step": seconds_per_step,
            "psnr": psnr(protected, clean).mean().item(),
            "latent_distortion": before.mean().item(),
            "surviving": surviving,
            "distortion_after": after,
        }
        print(f"{label}: {seconds_per_step:.2f} s/step", flush=True)

    print(markdown(results, purifications, args))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"assets": str(args.assets), "json": str(args.json)},
                    "results": results,
                },
                indent=2,
            )
        )


def markdown(results: dict, purifications, args) -> str:
    """The README table: one row per purification, one column per protection."""
    labels = list(results)
    head = "| purification | " + " | ".join(f"`{label}`" for label in labels) + " |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    lines.append(
        "| ‖E(x_adv) − E(x0)‖ (no purification) | "
        + " | ".join(f"{results[k]['latent_distortion']:.1f}" for k in labels)
        + " |"
    )
    lines.append(
        "| PSNR of the protected image (dB) | "
        + " | ".join(f"{results[k]['psnr']:.1f}" for k in labels)
        + " |"
    )
    for p in purifications:
        cells = " | ".join(
            f"{results[k]['surviving'][p.name]:.2f} ({results[k]['distortion_after'][p.name]:.0f})"
            for k in labels
        )
        summary = p.summary + (" (TAEF2's own decoder)" if p.name == "vae" else "")
        lines.append(f"| `{p.name}`: {summary} | {cells} |")
    lines.append(
        "| `sdedit`: SDEdit at t=0.1 | " + " | ".join("n/a (no UNet)" for _ in labels) + " |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
