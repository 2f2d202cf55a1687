#!/usr/bin/env bash
# Several nodes: run this SAME command on every node (in any order, within the rendezvous timeout). The
# torchrun agents meet in a c10d rendezvous at MASTER_ADDR:MASTER_PORT, agree on ranks, and each starts
# NPROC ranks of `python -m fp8train`. Every argument is a Hydra override.
#
#   NNODES=2 NPROC=8 MASTER_ADDR=node0.cluster RUN_ID=exp42 launch/multi_node.sh precision=fp8_o3 \
#       hydra.run.dir=/shared/runs/exp42
#
# Variables:
#   NNODES           number of nodes (required)
#   MASTER_ADDR      address of the node that hosts the rendezvous store, reachable from every node (required)
#   NPROC            processes per node; default: the number of GPUs (nvidia-smi -L), or 2 without GPUs
#   MASTER_PORT      rendezvous port on MASTER_ADDR; default 29500
#   RUN_ID           rendezvous id, the same on every node, unique per job; default fp8train
#   NODE_ADDR        optional: this node's own address, passed as --local-addr. Needed where the hostname
#                    does not resolve to a reachable address (network namespaces, some containers)
#   RDZV_IS_HOST     optional: 1 on the node that hosts the store, 0 elsewhere (--rdzv-conf=is_host=...);
#                    torchrun guesses it by comparing MASTER_ADDR with its own addresses, which fails when
#                    the names do not resolve. Set it together with NODE_ADDR
#   MAX_RESTARTS     torchrun --max-restarts: how often this node's agent restarts its workers after a
#                    failure (its own, or a peer's that broke a collective); default 0. A node that died
#                    entirely must be started again by the scheduler (launch/README.md, "A node dies")
#   JOIN_TIMEOUT_S   seconds an agent waits in a rendezvous for all NNODES nodes (--rdzv-conf join_timeout):
#                    at the start, and after a failure for a node to come back; default torchrun's, 600
#   TORCHRUN         the torchrun command; default `torchrun` (e.g. "python -m torch.distributed.run")
#   OMP_NUM_THREADS  OpenMP threads per process; default: cores / NPROC (at least 1), so the processes share
#                    the node's cores without oversubscribing them (torchrun would pick 1, with a warning).
#                    On CPU the trainer sets torch's threads to the same figure, or launcher.cpu_threads
# hydra.run.dir must be on a filesystem every node sees (each rank writes its own checkpoint shard there;
# only rank 0 writes metrics). A deterministic run dir plus resume=auto means rerunning the job continues it.
set -euo pipefail

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

: "${NNODES:?set NNODES, the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of the rendezvous host}"
NPROC=${NPROC:-$(gpu_count)}
[ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=2
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-fp8train}
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
# A fresh worker store per rendezvous round, hosted by rank 0, instead of the agents' shared one: a
# node started again after dying cannot join a round of the shared store (its agent waits for the
# store address, which only a new rank 0 agent publishes), and a fresh store holds no stale keys
# (fp8train/trainer/distributed.py, _attempt_store)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

args=(--nnodes="$NNODES" --nproc-per-node="$NPROC" --rdzv-backend=c10d
      --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID" --max-restarts="${MAX_RESTARTS:-0}")
[ -n "${NODE_ADDR:-}" ] && args+=(--local-addr="$NODE_ADDR")
conf=()
[ -n "${RDZV_IS_HOST:-}" ] && conf+=("is_host=$RDZV_IS_HOST")
[ -n "${JOIN_TIMEOUT_S:-}" ] && conf+=("join_timeout=$JOIN_TIMEOUT_S")
[ ${#conf[@]} -gt 0 ] && args+=(--rdzv-conf="$(IFS=,; echo "${conf[*]}")")

exec "${torchrun[@]}" "${args[@]}" -m fp8train "$@"
