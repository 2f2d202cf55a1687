#!/usr/bin/env bash
# Every GPU check of fp8train in one call: one H100/H200, at most 10 minutes (each step under its own
# time limit), one summary table at the end.
#
#   bash bench/gpu.sh            # on the GPU machine, from the repository root
#   bash bench/gpu.sh --dry-run  # the same steps on CPU with tiny shapes: run it here first
#
# Steps (each under its own time limit, so one slow step cannot eat the others'):
#   cuda-tests  tests/test_cuda.py: casts, tensor-core GEMMs, compiled FP8 Llama and the compiled
#               Fp8AdamW against eager, Transformer Engine where installed
#   linear      bench/linear.py: Fp8Linear fwd+bwd vs bf16 nn.Linear, eager and compiled, Llama-3-8B's MLP shapes
#   step        bench/step.py: trainer step, bf16 vs fp8_o2 vs fp8_o3, all compiled, llama_1b
#   optim       bench/optim.py: Fp8AdamW (compiled foreach, the CUDA default) vs torch AdamW(fused)
#   cast        bench/cast.py: amax + scale + cast vs memcpy, eager and compiled
# On the GPU machine fp8train is installed from this tree without dependencies (torch, numpy, yaml
# are there; Hydra and wandb are not needed by these steps). Each step's full output is kept in
# $OUT (or ./gpu-logs) as <step>.log.
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi
cd "$(dirname "$0")/.."
LOGS="${OUT:-gpu-logs}"
mkdir -p "$LOGS"

if (( DRY_RUN )); then
    PY="${PY:-.venv/bin/python}"
    LINEAR=(--dry-run); STEP=(--dry-run); OPTIM=(--dry-run); CAST=(--dry-run)
else
    PY="${PY:-python3}"
    # not editable: the package (configs included) lands in site-packages; -P below keeps the
    # source folder off sys.path, so the installed package is the one imported
    "$PY" -m pip install -q --no-deps --no-build-isolation . || { echo "gpu.sh: installing fp8train failed"; exit 1; }
    export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-16}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    LINEAR=(--device cuda --shapes 8192x4096x14336,8192x14336x4096)
    STEP=(--device cuda --models llama_1b --micro-batch 4 --seq 2048 --warmup 2 --repeat 4)
    OPTIM=(--device cuda --rounds 10 --cases 0,2,4,5,11,12)  # fused AdamW; Fp8AdamW defaults (compiled on CUDA), stochastic, eager; clip + step: torch, ours
    CAST=(--device cuda --sizes-m 64 256)
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

declare -a SUMMARY
run_step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | grep -v "^DEBUG" | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    (( rc == 124 )) && status="TIMEOUT (${limit}s)"
    (( rc != 0 && rc != 124 )) && status="FAILED (exit $rc)"
    SUMMARY+=("$(printf '%-11s | %-18s | %6ds | %s' "$name" "$status" $((SECONDS - start)) "$LOGS/$name.log")")
}

# time limits in seconds: together 10 min at most (the device tool allows 10 per call); each
# step compiles, so most of its time is compilation (TORCHINDUCTOR_COMPILE_THREADS above)
run_step cuda-tests 150 "$PY" -P -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
run_step linear 120 "$PY" -P bench/linear.py "${LINEAR[@]}"
run_step step 210 "$PY" -P bench/step.py "${STEP[@]}" --precisions bf16,fp8_o2,fp8_o3 --modes compiled
run_step optim 75 "$PY" -P bench/optim.py "${OPTIM[@]}"
run_step cast 45 "$PY" -P bench/cast.py "${CAST[@]}"

echo
echo "=== summary ($( ((DRY_RUN)) && echo "dry run on CPU" || echo "GPU" ))"
printf '%-11s | %-18s | %7s | %s\n' step status time log
for line in "${SUMMARY[@]}"; do echo "$line"; done
