#!/usr/bin/env bash
# One GPU session for fourbit's Triton kernels, in up to three parts of at most ~8 minutes each.
#
#   bash benchmarks/gpu/run.sh [RESULTS_ROOT] [PART...]
#        RESULTS_ROOT default benchmarks/results; PART one or more of quant, matmul, train
#        (default: all three). A device tool that limits one command to 10 minutes runs one part
#        per call: `run.sh benchmarks/results quant`, then `... matmul`, then `... train`.
#
# Needs a CUDA GPU with torch and triton (3.6 or newer) installed; no internet.
#   bitsandbytes: installs a carried wheel (benchmarks/gpu/wheels/ or shared/wheels/) if present;
#   without bitsandbytes the parity and bitsandbytes timings are skipped, the rest runs.
#   The GPU, driver and versions go to session.txt.
# quant:
#   1. kernel tests on the GPU (if pytest is installed): Triton == reference bit for bit,
#      bf16 output included                                                            (<= 210 s)
#   2. benchmarks/gpu/quant_gpu.py: copy bandwidth, Triton == reference on 8192 x 8192, parity with
#      bitsandbytes CUDA, a tensor past 2**31 elements, quantize/dequantize timings as GB/s and
#      % of the copy bandwidth                                                         (<= 200 s)
#   3. the compile report with this machine's triton (informative)                     (<= 40 s)
# matmul:
#   4. fused matmul tests on the GPU (forward, backward, autograd op vs float64)          (<= 150 s)
#   5. benchmarks/bench_matmul.py on the GPU: fourbit Triton vs bitsandbytes matmul_4bit vs
#      cuBLAS on the dense bf16 weight; Llama-3 projection shapes, M from 1 to 8192; cold
#      weights (L2 flushed before each call), CUDA graphs for M <= 16                   (<= 240 s)
# train (needs transformers and peft):
#   6. benchmarks/bench_train.py: a QLoRA step on 4 Llama-3-8B-shaped decoder layers, seq 2048,
#      r=16, bf16: fourbit vs bitsandbytes + PEFT, tokens/s and peak memory              (<= 300 s)
# Results: RESULTS_ROOT/<gpu-name>/{quant_gpu.json,.md,.png, quant_gpu_parity.json,
#          compile_report.json, matmul.json,.md,.png, train.json,.md,.png, session.txt}.
# Exit status: number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
root="${1:-benchmarks/results}"
shift $(($# > 0 ? 1 : 0))
parts=" ${*:-quant matmul train} "
for part in $parts; do
  case $part in quant | matmul | train) ;; *) echo "run.sh: unknown part '$part' (quant, matmul, train)" >&2; exit 2 ;; esac
done
failed=0

shopt -s nullglob
wheels=(benchmarks/gpu/wheels/bitsandbytes-*.whl shared/wheels/bitsandbytes-*.whl)
if ((${#wheels[@]})); then
  python3 -m pip install --quiet --no-index --no-deps "${wheels[0]}" || echo "run.sh: installing ${wheels[0]} failed"
fi

gpu=$(python3 -c "import torch; from benchmarks.harness import device_name; print(device_name('cuda') if torch.cuda.is_available() else '')")
if [ -z "$gpu" ]; then
  echo "run.sh: no CUDA device visible to torch; nothing to measure" >&2
  exit 1
fi
out="$root/$gpu"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1 || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
} | tee "$out/session.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@"; then
    echo "run.sh: $name ok ($((SECONDS - t0)) s)" | tee -a "$out/session.txt"
  else
    echo "run.sh: $name FAILED (exit $?, $((SECONDS - t0)) s)" | tee -a "$out/session.txt"
    failed=$((failed + 1))
  fi
}

has_pytest() { python3 -c "import pytest, hypothesis" 2>/dev/null; }

if [[ $parts == *" quant "* ]]; then
  if has_pytest; then
    step "kernel tests" 210 python3 -m pytest tests/test_kernels_quant.py -q -x -p no:cacheprovider
  else  # quant_gpu.py repeats the bit-exactness checks that matter most, so the session still says it
    echo "run.sh: kernel tests skipped (pytest/hypothesis not installed)" | tee -a "$out/session.txt"
  fi
  step "parity + timings" 200 python3 -m benchmarks.gpu.quant_gpu --out "$out"
  step "compile report" 40 python3 -m fourbit.kernels.report --arch sm_90a --only quantize --only dequantize \
    --json "$out/compile_report.json"
fi
if [[ $parts == *" matmul "* ]]; then
  if has_pytest; then
    step "matmul tests" 150 python3 -m pytest tests/test_matmul.py tests/test_functional.py -q -x -p no:cacheprovider
  fi
  step "matmul timings" 240 python3 -m benchmarks.bench_matmul --device cuda --dtype bfloat16 \
    --shapes 4096x4096 14336x4096 4096x14336 8192x8192 --ms 1 4 16 64 128 2048 8192 --out "$out"
fi
if [[ $parts == *" train "* ]]; then
  if python3 -c "import transformers, peft" 2>/dev/null; then
    step "train step" 300 python3 -m benchmarks.bench_train --model llama3-8b:4 --seq-len 2048 --batch-size 1 \
      --steps 6 --out "$out"
  else
    echo "run.sh: train step skipped (transformers/peft not installed)" | tee -a "$out/session.txt"
  fi
fi
exit "$failed"
