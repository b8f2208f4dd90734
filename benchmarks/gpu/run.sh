#!/usr/bin/env bash
# The whole GPU session in one call of at most 7 minutes: every headline number, into OUTDIR.
#
#   bash benchmarks/gpu/run.sh OUTDIR             on a machine with a CUDA GPU (an H200 in mind)
#   bash benchmarks/gpu/run.sh --dry-run OUTDIR   the same stages on the CPU, Triton interpreter,
#                                                 tiny shapes: proves the plumbing (CI runs it)
#
# Stages, each under its own `timeout`: the time it may take is what remains of the 420 s minus the
# budgets of the stages after it, so a quick stage hands its spare seconds on and no stage can eat
# a later one's share. GPU budget (seconds, a fresh machine, Triton compiling from scratch):
#   install      15  check the image (python, torch with CUDA, triton >= 3.6); install the carried
#                    bitsandbytes wheel (benchmarks/gpu/wheels/, filled by fetch_wheels.sh) with
#                    --no-index --no-deps --target and PYTHONPATH; without it the session runs on
#                    and every bitsandbytes comparison says the peer is missing
#   env          30  GPU, clocks, driver, versions; measured copy GB/s and bf16 matmul TFLOP/s
#   correctness 105  bytes vs the reference and vs bitsandbytes CUDA (8192^2, a tensor past 2^31
#                    elements), bf16 rounding, matmul forward/backward bf16 vs float64 (4 shapes),
#                    every matmul kernel variant the timings pick (GEMV M = 1..16, 4 and 8 warps,
#                    ragged K and N, bias, views; M = 2048) and the swapped tiles' exact
#                    integer-input test, 20 times (benchmarks/gpu/variants.py)
#   timings     135  dequantize, matmul M=1/16 (CUDA graphs), M=2048 forward and backward on the
#                    five Llama-3 shapes: fourbit vs bitsandbytes vs dense cuBLAS, L2 flushed
#   train        95  one QLoRA step on 4 Llama-3-8B-shaped layers, seq 2048: fourbit vs bnb + PEFT
#   plan         15  `fourbit plan` vs torch.cuda.max_memory_allocated, the same model shape, batch
#                    1 x 2048, three optimizer steps (benchmarks/gpu/plan_check.py)
#   predicted    15  the cost model's predictions (run in the background from the start, on the
#                    CPU) joined with the timings; "costmodel missing" when the module is absent
#   summary      10  schema, file count, OUTDIR/summary.md and the summary line
# OUTDIR gets results.jsonl (every number, one JSON line per case, appended as each finishes, so a
# timeout keeps what was measured), session.log (everything printed), summary.md, costmodel.json.
# Exit status 0 when every stage passed and the summary holds, 1 otherwise, 2 for bad arguments.
set -uo pipefail
SECONDS=0  # the budget counts from here: the image check below is part of the 7 minutes
export FOURBIT_SESSION_T0=$(date +%s)  # the rows' clock (results.jsonl "t") is the stage lines' clock
usage="usage: bash benchmarks/gpu/run.sh [--dry-run] OUTDIR"
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
if [ $# -ne 1 ] || [[ $1 == -* ]]; then echo "$usage" >&2; exit 2; fi
out=$1
cd "$(dirname "$0")/../.."
repo=$PWD

stages=(install env correctness timings train plan predicted summary)
declare -A gpu_budget=([install]=15 [env]=30 [correctness]=105 [timings]=135 [train]=95 [plan]=15 [predicted]=15 [summary]=10)
limit=420  # 7 minutes of the device's 10-minute command limit: a fresh machine and the transfers fit beside it
if ((dry)); then  # the CPU interpreter is slower and this machine's 2 cores are shared: its own budget
  declare -A budget=([install]=30 [env]=40 [correctness]=110 [timings]=60 [train]=120 [plan]=90 [predicted]=20 [summary]=20)
  dry_limit=0; for s in "${stages[@]}"; do dry_limit=$((dry_limit + ${budget[$s]})); done
else
  declare -A budget; for s in "${stages[@]}"; do budget[$s]=${gpu_budget[$s]}; done
fi
total=0; for s in "${stages[@]}"; do total=$((total + ${budget[$s]})); done
gpu_text=""; for s in "${stages[@]}"; do gpu_text+="$s=${gpu_budget[$s]} "; done

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ((dry)); then
  export TRITON_INTERPRET=1 FOURBIT_BACKEND=triton CUDA_VISIBLE_DEVICES=""
  flag=--dry-run
else
  unset TRITON_INTERPRET FOURBIT_BACKEND
  flag=""
  if ! timeout 120 python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run.sh: no CUDA device visible to torch; nothing to measure (--dry-run runs on the CPU)" >&2
    exit 1
  fi
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
if [ -n "$(ls -A "$out")" ]; then echo "run.sh: $out is not empty; give each session a fresh folder" >&2; exit 2; fi
exec > >(tee -a "$out/session.log") 2>&1
tee_pid=$!
site=$(mktemp -d "${TMPDIR:-/tmp}/fourbit-site.XXXXXX")
trap 'rm -rf "$site"' EXIT
echo "run.sh: $(date -u) dry_run=$dry out=$out budget ${total} s"

later_budget() {  # seconds budgeted for the stages after $1
  local s found=0 sum=0
  for s in "${stages[@]}"; do
    ((found)) && sum=$((sum + ${budget[$s]}))
    [ "$s" = "$1" ] && found=1
  done
  echo $sum
}
failed=0
stage() {  # stage NAME COMMAND...: run it under what remains of the budget; log one "stage" line
  local name=$1; shift
  local t0=$SECONDS rc
  local left=$(( (dry ? dry_limit : limit) - SECONDS - $(later_budget "$name") - 3 ))  # 3: timeout's grace
  if ((left < 1)); then
    rc=124; echo "run.sh: $name skipped, no time left"
  else
    echo "run.sh: == $name (budget ${budget[$name]} s, timeout $left s, at ${SECONDS} s)"
    timeout -k 3 "$left" bash -c '"$@"' "$name" "$@"; rc=$?  # bash -c: NAME may be a function
  fi
  local elapsed=$((SECONDS - t0))
  printf '{"stage": "run.sh", "kind": "stage", "name": "%s", "t": %d, "budget_s": %d, "gpu_budget_s": %d, "timeout_s": %d, "elapsed_s": %d, "rc": %d}\n' \
    "$name" "$SECONDS" "${budget[$name]}" "${gpu_budget[$name]}" "$left" "$elapsed" "$rc" >>"$out/results.jsonl"
  echo "run.sh: $name $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc = 124 ] && echo ', timed out'))") in $elapsed s"
  ((rc == 0)) || failed=$((failed + 1))
  return $rc
}

preflight() {  # the image's versions before anything else; then the carried wheel
  python3 - "$dry" <<'EOF' || return 1
import sys
import torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}")
if sys.version_info < (3, 10):
    sys.exit("run.sh: fourbit needs python >= 3.10")
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6):
    sys.exit(f"run.sh: fourbit's kernels need triton >= 3.6, found {triton.__version__}")
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit("run.sh: torch sees no CUDA device")
EOF
  shopt -s nullglob
  local wheels=(benchmarks/gpu/wheels/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "run.sh: no carried wheels in benchmarks/gpu/wheels/ (bash benchmarks/gpu/fetch_wheels.sh fills it)"
    return 0
  fi
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
    && echo "run.sh: installed $(cd "$site" && ls -d *.dist-info | tr '\n' ' ')into $site"
}

session() { python3 -m benchmarks.gpu.session "$1" --out "$out" $flag; }
export -f preflight session
export site out dry flag

stage install preflight && [ -n "$(ls -A "$site")" ] && export PYTHONPATH="$site:$PYTHONPATH"

cm_pid=""
if [ -f fourbit/kernels/analysis/costmodel.py ]; then  # CPU work: overlaps the GPU stages, done before 'predicted'
  if ((dry)); then  # the dry run's shapes, so that the join has rows to make (compiled, not interpreted)
    cm_args=(--op gemv --op dequantize --m 1 --shape 64x128 --shape 96x192)
  else  # the five Llama-3 shapes (its default) at the Ms the timings measure
    cm_args=(--m 1 --m 16 --m 2048)
  fi
  cm_left=$(( (dry ? dry_limit : limit) - SECONDS - ${budget[predicted]} - ${budget[summary]} ))
  ( timeout -k 3 "$cm_left" env -u TRITON_INTERPRET python3 -m fourbit.kernels.analysis.costmodel --arch sm_90a "${cm_args[@]}" \
      --json "$out/costmodel.json" 2>&1 | sed 's/^/costmodel: /' ) &
  cm_pid=$!
fi

stage env session env
stage correctness session correctness
stage timings session timings
if ((dry)); then  # the reference backend: the interpreter would spend minutes on a training step
  stage train env -u FOURBIT_BACKEND python3 -m benchmarks.bench_train --model tiny-llama:1 --seq-len 16 --smoke --session "$out"
else
  stage train python3 -m benchmarks.bench_train --model llama3-8b:4 --seq-len 2048 --batch-size 1 --steps 5 --session "$out"
fi
if ((dry)); then  # the reference backend, as the run it plans: fake tensors cannot enter the interpreter
  stage plan env -u FOURBIT_BACKEND python3 -m benchmarks.gpu.plan_check --out "$out" $flag
else
  stage plan python3 -m benchmarks.gpu.plan_check --out "$out" $flag
fi
[ -n "$cm_pid" ] && wait "$cm_pid"
stage predicted session predicted
stage summary python3 -m benchmarks.gpu.summary "$out" --budget "$gpu_text" --limit "$limit"
if ((dry)); then echo "run.sh: dry run took ${SECONDS} s on this machine (its own budget ${dry_limit} s)"; fi
echo "run.sh: done in ${SECONDS} s, $failed failed stage(s); files: $(ls "$out" | tr '\n' ' ')"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # session.log complete before the device tool collects OUTDIR
exit $((failed > 0))
