"""On a CUDA machine: do the same seed and images give the same protected bytes?

Protects the same random images several times on the full-size SD 1.x architecture (random
weights) and prints, per method, whether the saved 8-bit images are identical and the largest
difference:

- ``repeat``: the default (deterministic) run twice; must be identical;
- ``graphs``: a run whose steps replay a CUDA graph, against the eager run; must be identical;
- ``robust``: ``--robust jpeg,resize,blur`` twice (EOT through kornia's JPEG); must be identical;
- ``nondeterministic``: ``--nondeterministic`` twice; reported only (it may differ).

Run by ``scripts/gpu_bench.sh``; exits 1 if a "must" fails.

python scripts/check_reproducibility.py --res 512 --steps 5 --methods sds-,advdm+,photoguard
"""

from __future__ import annotations

import argparse
import sys

import torch

from mimicshield.bench import architecture, bench_images, build_engine_model
from mimicshield.protector import Protector


def compare(name: str, first: torch.Tensor, second: torch.Tensor, required: bool) -> bool:
    """Print whether two protected batches have the same 8-bit bytes; False on a required miss."""
    a, b = ((out * 255).round().to(torch.uint8) for out in (first, second))
    same = torch.equal(a, b)
    largest = (a.int() - b.int()).abs().max().item()
    pixels = (a != b).float().mean().item()
    kind = "must match" if required else "reported"
    print(f"  {name} ({kind}): identical {same}, {pixels:.2%} differ, largest {largest}/255")
    return same or not required


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="sds-,advdm+,mist,photoguard")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_reproducibility: no CUDA device; nothing to check")
        return 0

    model = build_engine_model(architecture(), torch.device("cuda"), torch.bfloat16)
    images = bench_images(args.batch, args.res, seed=0)
    ok = True
    for method in args.methods.split(","):
        print(method)

        def run(method: str = method, **options) -> torch.Tensor:
            return Protector(model, method, steps=args.steps, **options)(images)

        eager = run()
        ok &= compare("repeat", eager, run(), required=True)
        graphed = Protector(model, method, steps=args.steps, cuda_graphs=True)
        ok &= compare("graphs", eager, graphed(images), required=True)
        if graphed.graph_replays == 0:  # an eager fallback would match trivially
            print("  graphs: never replayed (the capture fell back to eager steps)")
            ok = False
        robust = ("jpeg", "resize", "blur")
        ok &= compare("robust", run(robust=robust), run(robust=robust), required=True)
        loose = run(deterministic=False)
        compare("nondeterministic", loose, run(deterministic=False), required=False)
        compare("nondeterministic vs deterministic", loose, eager, required=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
