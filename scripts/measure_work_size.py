"""Measure which ``--work-size`` default keeps more protection after an attacker's resize.

Why: SD 1.x pipelines resize images (to 512 on the shorter side) before encoding them. A
perturbation computed at full resolution is partly averaged away by that downscale; one computed
at 512 and resized back onto the original might survive it better. This script measures that on
the real TAEF2 encoder (``../shared/assets/weights``) and the real images in
``../shared/assets/images``, with an encoder-only method (``encoder`` or ``photoguard``: no
UNet needed).

For every image and scale it protects the image twice (native resolution and ``--work-size``),
quantises to 8 bits as the saved file would be, then reports the relative latent distortion

    d = ||E(r(x_adv)) - E(r(x0))|| / ||E(r(x0))||

for the attacker's resize r (shorter side to ``--attacker-size``, centre crop to a square, as
diffusers' training scripts do), and, for reference, without any resize (the attacker encodes
the file as it is). Usage (a few minutes on one H200; on a CPU use the small settings)::

    python scripts/measure_work_size.py --method encoder --scales 1 2 4 --tile-size 4096
    # on a CPU, scaled down (the first two images: shorter sides 216-280 px, against an
    # attacker at 128): about a minute per image on 2 cores
    python scripts/measure_work_size.py --scales 0.5 --attacker-size 128 --work-size 128 \\
        --steps 10 --step-size 4 --limit 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mimicshield.images import IMAGE_SUFFIXES, load_image
from mimicshield.protector import Protector
from mimicshield.resolution import pad_to_multiple, protect_at_work_size
from mimicshield.runner import to_file_grid
from mimicshield.taesd import TinyAutoencoderLatents

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, 3, H, W) so the shorter side is ``size`` (bicubic, antialiased, like PIL)."""
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    if shape == (height, width):
        return x
    return F.interpolate(x, size=shape, mode="bicubic", antialias=True).clamp(0, 1)


def attacker_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """What an SD pipeline feeds its VAE: shorter side to ``size``, centre crop ``size``²."""
    x = resize_shorter(x, size)
    height, width = x.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return x[..., top : top + size, left : left + size]


@torch.no_grad()
def distortion(model, adversarial: torch.Tensor, clean: torch.Tensor) -> float:
    """||E(x_adv) - E(x0)|| / ||E(x0)|| for (1, 3, H, W) images in [0, 1]."""
    z_adv = model.encode(pad_to_multiple(adversarial).to(model.device) * 2 - 1)
    z_clean = model.encode(pad_to_multiple(clean).to(model.device) * 2 - 1)
    return float((z_adv - z_clean).norm() / z_clean.norm())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a.double() - b.double()).pow(2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=ASSETS / "images")
    parser.add_argument("--weights", type=Path, default=ASSETS / "weights")
    parser.add_argument("--method", default="encoder", choices=["encoder", "photoguard"])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--work-size", type=int, default=512)
    parser.add_argument("--attacker-size", type=int, default=512)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--eps", type=float, default=16, help="in 1/255 units")
    parser.add_argument("--step-size", type=float, default=1, help="in 1/255 units")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    model = TinyAutoencoderLatents.from_dir(args.weights, device=args.device)
    protector = Protector(
        model, args.method, eps=args.eps / 255, step_size=args.step_size / 255, steps=args.steps
    )
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = paths[: args.limit]

    eps = args.eps / 255
    rows = []
    for scale in args.scales:
        for path in paths:
            loaded = load_image(path)
            clean = loaded.rgb[None]
            height, width = clean.shape[-2:]
            size = (max(8, round(height * scale)), max(8, round(width * scale)))
            if scale != 1:
                clean = F.interpolate(clean, size=size, mode="bicubic", antialias=True).clamp(0, 1)
            row = {"image": path.name, "scale": scale, "width": size[1], "height": size[0]}
            for label, work_size in (("native", None), ("work", args.work_size)):
                started = time.perf_counter()
                adversarial = protect_at_work_size(
                    protector, [clean[0]], work_size=work_size, tile_size=args.tile_size
                )[0]
                if args.device == "cuda":
                    torch.cuda.synchronize()
                row[f"{label}_seconds"] = time.perf_counter() - started
                adversarial = to_file_grid(adversarial, clean[0], eps, 255, loaded.grey)[None]
                row[f"{label}_psnr"] = psnr(adversarial, clean)
                row[f"{label}_resized"] = distortion(
                    model,
                    attacker_view(adversarial, args.attacker_size),
                    attacker_view(clean, args.attacker_size),
                )
                row[f"{label}_as_is"] = distortion(model, adversarial, clean)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print_table(rows, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"arguments": vars(args), "rows": rows}, default=str))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    work = f"work {args.work_size}"
    r = f"after resize to {args.attacker_size}"
    print(
        f"\n| image | size | native: d {r} | {work}: d {r} | native: d as is | {work}: d as is "
        f"| PSNR native / {work} |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['image']} | {row['width']}×{row['height']} | {row['native_resized']:.4f} "
            f"| {row['work_resized']:.4f} | {row['native_as_is']:.4f} | {row['work_as_is']:.4f} "
            f"| {row['native_psnr']:.1f} / {row['work_psnr']:.1f} |"
        )
    for scale in sorted({row["scale"] for row in rows}):
        group = [row for row in rows if row["scale"] == scale]

        def mean(key: str, group: list[dict] = group) -> float:
            return sum(row[key] for row in group) / len(group)

        print(
            f"| **mean, scale {scale:g}** ({len(group)} images) | "
            f"| **{mean('native_resized'):.4f}** | **{mean('work_resized'):.4f}** "
            f"| {mean('native_as_is'):.4f} "
            f"| {mean('work_as_is'):.4f} | {mean('native_psnr'):.1f} / {mean('work_psnr'):.1f} |"
        )


if __name__ == "__main__":
    main()
