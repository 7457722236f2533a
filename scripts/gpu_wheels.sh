#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_bench.sh needs on the lent GPU machine, which has
# torch, transformers and torchmetrics but no diffusers or kornia, and no network (.whl/ is
# git-ignored: name it in the device tool's `carry`). Versions: the ones the test suite runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
platforms=()
for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in diffusers kornia kornia-rs; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    "$name==$(version "$name")"
done
ls -la .whl
