#!/usr/bin/env bash
# One-GPU readiness check (issue 12 item 5, issue 18's GPU item). Under 8 minutes on one H100/H200:
#   1. bf16 tokens/s and MFU of `small` against transformers (tools/bench_model.py),
#   2. the FP8 emulation against torch's FP8 GEMMs (row-wise `_scaled_mm`, block-wise
#      `F.scaled_mm` or `_scaled_mm`) and Transformer Engine's block-scaling recipe where they
#      exist, FP8/BF16 GEMM speed, and `small`'s step time and peak memory in BF16 and under the
#      FP8 emulation (tools/gpu_fp8_check.py),
#   3. on the machine's CPU cores, the real-stage pipeline benchmark of issue 18 with a core per rank
#      (tools/bench_pipeline.py --part real), which the 2-core development machines cannot give.
# Every part either gives its figures or says "skipped: <reason>" (a missing optional package or
# API, a torch built with CUDA < 12.9, ...). Results go under $OUT (default ./gpu_check_out): one
# log per part, fp8_check.json, nvidia-smi.txt, summary.txt (written as it goes, complete at the end).
# Exit code: 0 if every part ran or was skipped with its reason and no check failed; 1 if a part
# failed or timed out; 2 if no python with a CUDA torch was found.
#
#   bash tools/gpu_check.sh                  # from anywhere; the first python whose torch has CUDA
#   OUT=/tmp/gc PYTHON=python3 bash tools/gpu_check.sh
#   bash tools/gpu_check.sh --dry-run        # any machine: the control flow, CUDA parts skipped
#
# The python: $PYTHON if set, else the first of .venv/bin/python, python3, python whose torch
# sees a CUDA device (a venv carried from a CPU machine has a CPU-only torch); with --dry-run the
# first whose torch imports. Time: each part has its own `timeout`, and all parts share a budget
# of $BUDGET_S seconds (default 450), so the script ends within about 8 minutes.
#
# Not run yet: no GPU machine has been available (docs/performance.md).
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT=${OUT:-./gpu_check_out}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "[gpu_check] $*" | tee -a "$summary"; }

# 0. The python: the first candidate whose torch has CUDA (one torch import each).
if [[ $DRY_RUN -eq 1 ]]; then
  probe='import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda, "(dry run: no CUDA needed)")'
else
  probe='
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, torch.cuda.is_available() False")
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0),
      "cc", torch.cuda.get_device_capability(0))'
fi
if [[ -n "${PYTHON:-}" ]]; then candidates=("$PYTHON"); else candidates=(.venv/bin/python python3 python); fi
tried=""
gpu=""
for cand in "${candidates[@]}"; do
  if ! command -v "$cand" > /dev/null 2>&1; then tried+=" $cand: not found;"; continue; fi
  if out=$(timeout 120 "$cand" -c "$probe" 2>&1); then PYTHON=$cand; gpu=$out; break; fi
  tried+=" $cand: $(echo "$out" | tail -n 1 | cut -c1-200);"
done
if [[ -z "$gpu" ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then note "FAILED: no python with torch found (tried:$tried)"; exit 2; fi
  note "FAILED: no CUDA device visible to torch (tried:$tried). This script needs one NVIDIA GPU (H100/H200)" \
       "and a python whose torch is a CUDA build (set PYTHON=...)."
  exit 2
fi
note "python: $PYTHON ($(command -v "$PYTHON"))${tried:+; passed over:$tried}"
note "$gpu"
[[ $DRY_RUN -eq 0 ]] && { nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; }
note "start $(date -u +%FT%TZ), results in $OUT, time budget ${BUDGET_S} s"

# Versions of the optional packages, and whether part 1's peer imports.
"$PYTHON" - > "$OUT/packages.txt" 2>&1 <<'EOF'
import importlib
for name in ("transformers", "transformer_engine", "omegaconf"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "absent:", type(e).__name__, str(e)[:200])
EOF
sed 's/^/    /' "$OUT/packages.txt" | tee -a "$summary"
part1_skip=""
if ! why=$(timeout 120 "$PYTHON" -c '
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401
import tools.bench_model  # noqa: F401' 2>&1); then
  part1_skip="transformers with DeepseekV3ForCausalLM (or tools.bench_model) does not import: $(echo "$why" | tail -n 1 | cut -c1-300)"
fi
if [[ $DRY_RUN -eq 1 ]]; then
  part1_skip="dry run (part 1 times megads and transformers on CUDA; its imports: ${part1_skip:-ok})"
fi

status=0
run_part() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - 15))
  if [[ $left -lt 30 ]]; then
    note "$name: skipped: time budget spent (${SECONDS} s of ${BUDGET_S} s used)"; return
  fi
  [[ $left -lt $limit ]] && limit=$left
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
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
if [[ -n "$part1_skip" ]]; then
  note "bench_model_bf16: skipped: $part1_skip"
else
  run_part bench_model_bf16 210 "$PYTHON" -m tools.bench_model --device cuda --precision bf16 \
    --presets small --batch 8 --seq 2048 --iters 5
  grep -E "^(small|preset|peer|lower)" "$OUT/bench_model_bf16.log" 2>/dev/null | sed 's/^/    /' | tee -a "$summary"
fi

# 2. FP8: agreement with torch / TE, GEMM speed, model step time and peak memory. The check's own
#    budget ends its later checks ("skipped: time budget") before the part's timeout would.
left=$((BUDGET_S - SECONDS - 15)); fp8_limit=$(( left < 190 ? left : 190 ))
if [[ $DRY_RUN -eq 1 ]]; then
  run_part fp8_check 120 "$PYTHON" -m tools.gpu_fp8_check --dry-run --out "$OUT"
else
  run_part fp8_check 190 "$PYTHON" -m tools.gpu_fp8_check --device cuda --out "$OUT" \
    --budget $(( fp8_limit > 60 ? fp8_limit - 45 : 15 ))
fi
grep "^\[gpu_fp8_check\]" "$OUT/fp8_check.log" 2>/dev/null | cut -c1-400 | sed 's/^/    /' | tee -a "$summary"

# 3. CPU, while this machine is here: the real-stage pipeline of issue 18 (megads DualPipeV with the
#    F&B overlap against torch's ScheduleDualPipeV, pp 2 x ep 2 on 4 gloo ranks of one thread
#    each). On the 2-core development machines the 4 ranks share 2 cores and the overlap has no
#    idle core to fill; here each rank gets a core of its own. Last, so that it never delays the
#    GPU parts, and skipped when the budget is spent.
cores=$(nproc)
if [[ $DRY_RUN -eq 1 ]]; then
  run_part pipeline_real_cpu 120 "$PYTHON" -m tools.bench_pipeline --part real --models tiny --repeats 1 \
    --warmup 0 --img-dir "$OUT" --json "$OUT/bench_pipeline.json"
elif [[ $cores -lt 4 ]]; then
  note "pipeline_real_cpu: skipped: $cores CPU cores, it needs one per rank (4)"
else
  run_part pipeline_real_cpu 100 "$PYTHON" -m tools.bench_pipeline --part real --models tiny small --repeats 3 \
    --warmup 1 --img-dir "$OUT" --json "$OUT/bench_pipeline.json"
fi
grep -E "megads / torch" "$OUT/pipeline_real_cpu.log" 2>/dev/null | cut -c1-300 | sed "s/^/    ($cores cores) /" | tee -a "$summary"

note "end $(date -u +%FT%TZ), $SECONDS s in all, exit $status"
exit $status
