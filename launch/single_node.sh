#!/usr/bin/env bash
# One node, N processes: torchrun --standalone starts NPROC ranks of `python -m fp8train` (rendezvous on a
# free local port, so several jobs can share a machine). Every argument is a Hydra override.
#
#   launch/single_node.sh precision=fp8_o3 train.steps=1000
#   NPROC=2 launch/single_node.sh experiment=smoke launcher.device=cpu hydra.run.dir=outputs/smoke-2p
#
# Variables (all optional):
#   NPROC            processes on this node; default: the number of GPUs (nvidia-smi -L), or 2 without GPUs
#   TORCHRUN         the torchrun command; default `torchrun` (e.g. "python -m torch.distributed.run")
#   OMP_NUM_THREADS  OpenMP threads per process; default: cores / NPROC (at least 1), so the processes share
#                    the node's cores without oversubscribing them (torchrun would pick 1, with a warning).
#                    On CPU the trainer sets torch's threads to the same figure, or launcher.cpu_threads.
# Outputs go to hydra.run.dir (default outputs/<model>-<precision>); running the same command again resumes
# from its latest checkpoint (resume=auto).
set -euo pipefail

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

NPROC=${NPROC:-$(gpu_count)}
[ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=2
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

exec "${torchrun[@]}" --standalone --nproc-per-node="$NPROC" -m fp8train "$@"
