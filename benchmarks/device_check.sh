#!/usr/bin/env bash
# GPU readiness check of ProtoSAM, in one go (about 5-8 minutes on one recent GPU):
#   1. the CUDA-only tests of Testing/ (must run, not skip),
#   2. bf16 autocast and the real out-of-memory fallback (benchmarks/device_check.py),
#   3. the propagation benchmark with the paper's models (DINOv2 ViT-L/14 + SAM ViT-H, random
#      weights), 200 slices x 4 structures: slices/s and peak GPU memory per phase.
#
# Usage (from anywhere; see benchmarks/README.md "GPU readiness check"):
#   bash benchmarks/device_check.sh               # on a CUDA machine
#   bash benchmarks/device_check.sh --cpu-smoke   # the same steps at tiny size on the CPU
#                                                 # (checks that the script starts and runs)
# Python: $PROTOSAM_PYTHON if set, else ./.venv/bin/python, else python3. Missing packages are
# installed from local wheels in ./.whl only (pip --no-index): nothing is downloaded.
# Results: $PROTOSAM_CHECK_OUT (default ./device_check_out): JSON reports and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=full
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=smoke ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "device_check.sh: unknown option $1 (use --cpu-smoke or nothing)" >&2; exit 2 ;;
esac
OUT_DIR=${PROTOSAM_CHECK_OUT:-$REPO/device_check_out}
WORK_DIR=${PROTOSAM_CHECK_WORK:-/tmp/protosam_device_check}
mkdir -p "$OUT_DIR" "$WORK_DIR"
STARTED=$SECONDS
step() { echo; echo "=== [$((SECONDS - STARTED)) s] $*"; }

# ---------------------------------------------------------------- environment
if [[ -n "${PROTOSAM_PYTHON:-}" ]]; then
  PY=$PROTOSAM_PYTHON
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi
step "environment: $PY ($("$PY" --version 2>&1))"
# module name -> distribution to install from ./.whl when the module is missing
MODULES=(torch:torch torchvision:torchvision segment_anything:segment-anything numpy:numpy scipy:scipy
         SimpleITK:SimpleITK PIL:pillow matplotlib:matplotlib pytest:pytest)
MISSING=()
for pair in "${MODULES[@]}"; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || MISSING+=("${pair#*:}")
done
if (( ${#MISSING[@]} )); then
  if [[ ! -d "$REPO/.whl" ]]; then
    echo "device_check.sh: missing Python packages: ${MISSING[*]}." >&2
    echo "Put their wheels (for this Python and platform) into $REPO/.whl, or point PROTOSAM_PYTHON at a" >&2
    echo "prepared environment (benchmarks/README.md, 'GPU readiness check')." >&2
    exit 3
  fi
  if [[ "$PY" == python3 ]]; then  # never install into the system Python: a venv that sees it
    python3 -m venv --system-site-packages "$WORK_DIR/venv"
    PY=$WORK_DIR/venv/bin/python
  fi
  echo "installing from $REPO/.whl only: ${MISSING[*]}"
  "$PY" -m pip install -q --no-index --find-links "$REPO/.whl" "${MISSING[@]}"
fi
export PYTHONPATH="$REPO/ProtoSAMLib${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import torch, protosam
print(f"protosam {protosam.__version__} from {protosam.__file__}; torch {torch.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF
if [[ $MODE == full ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check.sh: no CUDA device visible to torch; run with --cpu-smoke to check the script only." >&2
  exit 4
fi

# ---------------------------------------------------------------- 1. CUDA-only tests
# Every test module that skips without CUDA; -k cuda selects its CUDA tests.
mapfile -t CUDA_TESTS < <(grep -rl --include='test_*.py' 'not torch.cuda.is_available()' Testing | sort)
step "CUDA-only tests: ${CUDA_TESTS[*]}"
if [[ $MODE == full ]]; then
  # -rs lists skips; on a GPU machine a skipped CUDA test is a failure.
  timeout 180 "$PY" -m pytest "${CUDA_TESTS[@]}" -k cuda -q -rs -p no:cacheprovider | tee "$OUT_DIR/cuda_tests.log"
  if grep -qi "skipped" "$OUT_DIR/cuda_tests.log"; then
    echo "device_check.sh: CUDA tests were skipped on a CUDA machine" >&2
    exit 5
  fi
else
  timeout 180 "$PY" -m pytest "${CUDA_TESTS[@]}" -k cuda -q --collect-only -p no:cacheprovider | tee "$OUT_DIR/cuda_tests.log"
fi

# ---------------------------------------------------------------- 2. bf16 and out of memory
step "bf16 autocast and out-of-memory fallback"
if [[ $MODE == full ]]; then
  CHECK_ARGS=(--device cuda --dinov2 dinov2_vitl14 --sam vit_h --input-size 672)
else
  CHECK_ARGS=(--device cpu --dinov2 dinov2_tiny14 --sam sam_tiny --input-size 56 --slices 3 --size 64 --oom-batch 2)
fi
timeout 240 "$PY" benchmarks/device_check.py "${CHECK_ARGS[@]}" --work-dir "$WORK_DIR/checkpoints" \
  --out "$OUT_DIR/device_check.json"

# ---------------------------------------------------------------- 3. propagation benchmark
step "propagation benchmark"
if [[ $MODE == full ]]; then
  # Naive flow skipped (it re-encodes per structure and would not fit the time budget); the
  # phases are ours (paper preset, fp32, every slice) and ours_auto_extent (default preset:
  # bf16 autocast on CUDA, auto extent).
  BENCH_ARGS=(--device cuda --dinov2 dinov2_vitl14 --sam vit_h --input-size 672 --slices 200 --segments 4
              --volume synthetic --skip-naive)
else
  BENCH_ARGS=(--device cpu --dinov2 dinov2_tiny14 --sam sam_tiny --input-size 56 --slices 6 --segments 2
              --size 64 --volume synthetic --skip-naive --in-process)
fi
timeout 420 "$PY" benchmarks/propagation_benchmark.py "${BENCH_ARGS[@]}" --work-dir "$WORK_DIR/bench" \
  --out "$OUT_DIR/propagation_benchmark.json" | tee "$OUT_DIR/propagation_benchmark.log"
"$PY" - "$OUT_DIR/propagation_benchmark.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
config = report["config"]
print(f"\n{config['dinov2']} + SAM {config['sam']}, volume {tuple(report['volume']['shape'])}, "
      f"{len(report['volume']['structures'])} structures, device {report['machine']['device']}")
for name, phase in report["phases"].items():
    gpu = phase.get("peak_gpu_mib")
    print(f"{name:<20} {phase['slices_per_second']:8.2f} slices/s  preset {phase['preset']} ({phase['precision']})  "
          f"peak GPU memory {'%.0f MiB' % gpu if gpu is not None else 'n/a (CPU)'}")
EOF

step "done in $((SECONDS - STARTED)) s; reports in $OUT_DIR"
