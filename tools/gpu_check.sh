#!/usr/bin/env bash
# One-GPU readiness check (issue 12 item 5, issue 18's GPU item). Under 8 minutes on one H100/H200:
#   1. bf16 tokens/s and MFU of `small` against transformers (tools/bench_model.py),
#   2. the FP8 emulation against torch's FP8 GEMMs (row-wise `_scaled_mm`, block-wise `scaled_mm`)
#      and Transformer Engine's block-scaling recipe where they exist, FP8/BF16 GEMM speed, and
#      `small`'s step time and peak memory in BF16 and under the FP8 emulation
#      (tools/gpu_fp8_check.py).
# Results go under $OUT (default ./gpu_check_out): one log per part, fp8_check.json, nvidia-smi.txt,
# summary.txt. Exit code: 0 if every part ran and no check failed.
#
#   bash tools/gpu_check.sh                  # from the repository root, the venv's python
#   OUT=/tmp/gc PYTHON=python3 bash tools/gpu_check.sh
#
# Not run yet: no GPU machine has been available (docs/performance.md).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_check_out}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "[gpu_check] $*" | tee -a "$summary"; }

# 0. Fail early and clearly without a CUDA device (one torch import).
if ! gpu=$("$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0),
      "cc", torch.cuda.get_device_capability(0))' 2>&1); then
  note "FAILED: no CUDA device visible to torch ($gpu). This script needs one NVIDIA GPU (H100/H200)."
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
note "$gpu"
note "start $(date -u +%FT%TZ), results in $OUT"

status=0
run_part() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    note "$name: ok in $((SECONDS - t0)) s (log $OUT/$name.log)"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    note "$name: TIMED OUT after ${limit} s (log $OUT/$name.log)"; status=1
  else
    note "$name: FAILED with exit code $rc (log $OUT/$name.log; last lines below)"; status=1
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$summary"
  fi
}

# 1. bf16 small vs transformers: tokens/s, MFU (against the measured best bf16 GEMM rate; the
#    H100 SXM datasheet's dense bf16 peak is 989 TFLOP/s), 8 x 2048 tokens a step.
run_part bench_model_bf16 240 "$PYTHON" -m tools.bench_model --device cuda --precision bf16 \
  --presets small --batch 8 --seq 2048 --iters 5
grep -E "^(small|preset|peer|lower)" "$OUT/bench_model_bf16.log" | sed 's/^/    /' | tee -a "$summary" || true

# 2. FP8: agreement with torch / TE, GEMM speed, model step time and peak memory.
run_part fp8_check 200 "$PYTHON" -m tools.gpu_fp8_check --device cuda --out "$OUT"
grep "^\[gpu_fp8_check\]" "$OUT/fp8_check.log" | cut -c1-400 | sed 's/^/    /' | tee -a "$summary" || true

note "end $(date -u +%FT%TZ), $SECONDS s in all, exit $status"
exit $status
