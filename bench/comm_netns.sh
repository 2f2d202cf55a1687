#!/usr/bin/env bash
# The measurements bench/comm_model.py fits: bench/comm.py on pretend nodes (launch/netns_cluster.sh, one
# process per node, needs root) at each node count and link rate, appended to one JSON-lines file.
#
#   bash bench/comm_netns.sh [OUT] [NODES] [RATES] [SIZES] [REPEAT]
#   defaults: OUT=bench/comm_netns.jsonl  NODES="2 4"  RATES="1gbit 5gbit"  SIZES=4M,16M,64M  REPEAT=5
#
# Each setting brings the cluster up, runs, and takes it down (always, on exit too), holding the lock
# tests/netns_utils.py holds, so it never shares or tears down a cluster a test is using.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/comm_netns.jsonl}
NODES=${2:-2 4}
RATES=${3:-1gbit 5gbit}
SIZES=${4:-4M,16M,64M}
REPEAT=${5:-5}
CLUSTER=launch/netns_cluster.sh
PORT=29511
trap '$CLUSTER down >/dev/null 2>&1 || true' EXIT

run_setting() {  # run_setting NODES RATE
  local n=$1 rate=$2 gbit i pids=()
  gbit=$(awk -v r="$rate" 'BEGIN { v = r + 0; if (r ~ /mbit/) v /= 1000; print v }')
  $CLUSTER up "$n" "$rate" >/dev/null
  for (( i = n - 1; i >= 0; i-- )); do
    $CLUSTER exec "$i" sh -c "exec .venv/bin/torchrun --nnodes=$n --nproc-per-node=1 --node-rank=$i \
      --master-addr=\$MASTER_ADDR --master-port=$PORT bench/comm.py --sizes $SIZES --repeat $REPEAT \
      --no-split --label ${n}x$rate --link-gbit $gbit --json $OUT" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
  $CLUSTER down
}

(
  flock -x 9
  for n in $NODES; do
    for rate in $RATES; do
      run_setting "$n" "$rate"
    done
  done
) 9>/tmp/fp8train-netns_cluster.lock
