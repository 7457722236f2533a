"""On a CUDA machine: does a step replayed from a CUDA graph protect exactly as the eager step?

Protects the same random images with and without ``cuda_graphs`` on the full-size SD 1.x
architecture (random weights) and prints, per method, whether the saved 8-bit images are
identical and the largest difference. Run by ``scripts/gpu_bench.sh``; exits 1 on a mismatch.

python scripts/check_cuda_graphs.py --res 512 --steps 5 --methods sds-,advdm+,photoguard
"""

from __future__ import annotations

import argparse
import sys

import torch

from mimicshield.bench import architecture, bench_images, build_engine_model
from mimicshield.protector import Protector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="sds-,advdm+,mist,photoguard")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_cuda_graphs: no CUDA device; nothing to check")
        return 0

    device = torch.device("cuda")
    model = build_engine_model(architecture(), device, torch.bfloat16)
    images = bench_images(args.batch, args.res, seed=0)
    mismatches = 0
    for method in args.methods.split(","):
        outputs = [
            Protector(model, method, steps=args.steps, cuda_graphs=graphs)(images)
            for graphs in (False, True)
        ]
        eager, replayed = ((out * 255).round().to(torch.uint8) for out in outputs)
        same = torch.equal(eager, replayed)
        largest = (eager.int() - replayed.int()).abs().max().item()
        print(f"{method}: identical {same}, largest difference {largest}/255")
        mismatches += not same
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
