#!/usr/bin/env bash
# The DeepSpeed launcher runs the trainer: `deepspeed --module fp8train` starts NPROC local processes with
# RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE / MASTER_ADDR / MASTER_PORT set, which is all the trainer reads
# (launcher=local). DeepSpeed appends --local_rank=N to each command line; the CLI drops it (Hydra would
# reject it; DEEPSPEED_ARGS=--no_local_rank stops DeepSpeed adding it). The training itself is fp8train's (DDP / ZeRO from parallel=...), not DeepSpeed's engine.
# Arguments are Hydra overrides.
#
#   launch/deepspeed.sh precision=fp8_o3
#   NPROC=2 launch/deepspeed.sh experiment=smoke launcher.device=cpu hydra.run.dir=outputs/ds-smoke
#   DEEPSPEED_ARGS="--hostfile hosts --num_nodes 2" launch/deepspeed.sh ...   # multi-node (pdsh/ssh; untried)
#
# On CPU (tried here: DeepSpeed 0.19.8, 2 cores, no GPU) `--num_gpus N` works as it is: DeepSpeed finds no
# CUDA, picks its CPU accelerator itself (warning "Setting accelerator to CPU"; DS_ACCELERATOR=cpu forces it)
# and starts N processes on localhost. `--include localhost:0,1` fails there with
# `ValueError: No slot '1' specified on host 'localhost'`: the CPU accelerator counts NUMA nodes (here 1) as
# its devices, unless LOCAL_SIZE=N is exported, which makes it work. DeepSpeed also sets
# CUDA_VISIBLE_DEVICES=0,1,... on CPU, which does not matter.
#
# Variables (all optional):
#   NPROC            processes per node (--num_gpus); default: the number of GPUs (nvidia-smi -L), or 2
#   MASTER_PORT      rendezvous port (--master_port); default 29500, DeepSpeed's. Pick another when several
#                    jobs share a machine
#   DEEPSPEED        the launcher command; default `deepspeed`
#   DEEPSPEED_ARGS   more launcher options, e.g. "--hostfile hosts --num_nodes 2" or "--include localhost:0,1"
#                    (with --include/--exclude, --num_gpus is not passed: DeepSpeed refuses both together)
#   OMP_NUM_THREADS  OpenMP threads per process; default: cores / NPROC (at least 1)
set -euo pipefail

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

NPROC=${NPROC:-$(gpu_count)}
[ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=2
MASTER_PORT=${MASTER_PORT:-29500}
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
read -r -a deepspeed <<< "${DEEPSPEED:-deepspeed}"
read -r -a extra <<< "${DEEPSPEED_ARGS:-}"

args=(--master_port "$MASTER_PORT")
case " ${extra[*]} " in
  *" --include "* | *" -i "* | *" --exclude "* | *" -e "*) ;;
  *) args+=(--num_gpus "$NPROC") ;;
esac

exec "${deepspeed[@]}" "${args[@]}" "${extra[@]}" --module fp8train "$@"
