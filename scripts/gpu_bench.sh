#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run (about 9 minutes on an H100/H200).
#
# Runs from the repository root on a machine with a CUDA torch and transformers but no diffusers
# or kornia: their wheels travel in .whl/ (`bash scripts/gpu_wheels.sh` fills it here; it is
# git-ignored, so the device tool must carry it along explicitly).
# Each configuration group is its own process under its own time limit, and the bench records a
# failing configuration (out of memory, say) instead of stopping, so one failure loses one row.
#
# Writes into $OUT (default ./out/gpu-bench): bench_*.json and gpu_bench.log.
#
# For a dry run on the CPU:
#   BENCH_DEVICE=cpu BENCH_RES=64 BENCH_EXTRA=--tiny BENCH_WARMUP=1 BENCH_STEPS=2 \
#     OUT=/tmp/gpu-bench bash scripts/gpu_bench.sh
set -uo pipefail

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src

OUT=${OUT:-$PWD/out/gpu-bench}
DEVICE=${BENCH_DEVICE:-cuda}
RES=${BENCH_RES:-512}
WARMUP=${BENCH_WARMUP:-3}
STEPS=${BENCH_STEPS:-10}
EXTRA=${BENCH_EXTRA:-}
BUDGET=${BENCH_BUDGET_S:-520}  # stop starting new groups after this many seconds
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
export COLUMNS=200 PYTHONUNBUFFERED=1 MIMICSHIELD_DEBUG=1

log() { echo "[gpu_bench +${SECONDS}s] $*" | tee -a "$LOG"; }

# group NAME LIMIT_S ARGS...: one bench process; a timeout or crash is logged and the run goes on.
group() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then
    log "skip $name: ${left}s of the budget left"
    return
  fi
  ((limit > left)) && limit=$left
  log "start $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" python3 -m mimicshield.cli.main bench \
    --device "$DEVICE" --res "$RES" --warmup "$WARMUP" --steps "$STEPS" $EXTRA \
    --json-out "$OUT/bench_$name.json" "$@" >>"$LOG" 2>&1
  log "end $name: exit $?"
}

log "python3 $(python3 -c 'import sys; print(sys.version.split()[0])')"
if ! python3 -c "import diffusers, kornia, mimicshield" >>"$LOG" 2>&1; then
  log "cannot import diffusers, kornia or mimicshield: is .whl/ (scripts/gpu_wheels.sh) carried along?"
  exit 1
fi
python3 - >>"$LOG" 2>&1 <<'EOF'
import diffusers, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv >>"$LOG" 2>&1

# In order of what the open targets of issue 4 need most; a group that does not fit the budget
# is skipped, so the last ones are the first to go.
# 1. The main table: bf16 at batch 1 and 8, the floor, and the reference (fp32, batch 1).
group bf16 200 --methods sds-,advdm+,mist,photoguard --batch 1,8 --dtype bf16
# 2. Whether the same seed gives the same bytes: deterministic runs repeated, CUDA graphs against
#    eager, EOT through kornia's JPEG; and how far --nondeterministic runs drift.
log "start check_reproducibility"
timeout --kill-after=10 120 python3 scripts/check_reproducibility.py --res "$RES" --steps 5 \
  >>"$LOG" 2>&1
log "end check_reproducibility: exit $?"
# 3. CUDA graphs (no compilation) for the launch-bound batch 1.
group graphs 90 --methods sds-,advdm+,mist,photoguard --batch 1 --dtype bf16 --cuda-graphs \
  --no-reference --no-floor
# 4. --low-memory peak at batch 1 (SDS methods stream the UNet; AdvDM/Mist checkpoint it).
group lowmem 90 --methods sds-,advdm+,mist,photoguard --batch 1 --dtype bf16 --low-memory \
  --no-reference --no-floor
# 5. Speed candidates for sds-, each against group 1's eager bf16 rows: channels-last
#    convolutions; torch.compile (its "1st step s" is the compile time).
group nhwc 60 --methods sds- --batch 1,8 --dtype bf16 --channels-last --no-reference
group compiled 150 --methods sds- --batch 1,8 --dtype bf16 --compile --no-reference --no-floor
# 6. What deterministic mode costs (engine and floor without it); the fused GroupNorm+SiLU
#    (0.45 GiB less at batch 1, counted): its peak and its cost in time.
group nondet 60 --methods sds-,advdm+ --batch 1,8 --dtype bf16 --nondeterministic --no-reference
group fusednorm 60 --methods sds-,photoguard --batch 1,8 --dtype bf16 --fused-norm --no-reference
# 7. compile's own CUDA graphs (reduce-overhead); compiled fp16 at batch 8, the issue's anchor.
group compiled_graphs 150 --methods sds- --batch 1 --dtype bf16 --compile \
  --compile-mode reduce-overhead --no-reference --no-floor
group fp16_compiled 150 --methods sds- --batch 8 --dtype fp16 --compile --no-reference --no-floor

log "done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
