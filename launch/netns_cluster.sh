#!/usr/bin/env bash
# N pretend "nodes" on one Linux machine, for multi-node tests and benchmarks: each node is a network
# namespace with one interface (eth0) and its own address, plugged into a bridge by a link limited to
# RATE in each direction, like a NIC on a switch. Bytes on the wire then cost what they cost between
# machines, and torchrun's c10d rendezvous and gloo's collectives cross a real (virtual) network.
# Needs root and iproute2 (`ip`, `tc`); Linux only.
#
#   launch/netns_cluster.sh up N [RATE]    nodes 0..N-1 at 10.77.0.1 .. 10.77.0.N; RATE: a tc rate such as
#                                          1gbit (default), 100mbit, 10gbit, or `none` for no limit
#   launch/netns_cluster.sh exec I CMD...  CMD inside node I, with NODE_ADDR (its address), MASTER_ADDR (node
#                                          0's), NODE_INDEX=I and GLOO_SOCKET_IFNAME=eth0 in its environment
#   launch/netns_cluster.sh pids I         pids of every process inside node I, one per line
#   launch/netns_cluster.sh down           remove every node, the bridge and their links
#   launch/netns_cluster.sh status         the nodes that exist now
#
# Two nodes, one process each, running the trainer (inside a namespace the hostname does not resolve, so
# multi_node.sh gets NODE_ADDR from this script and is told which node hosts the rendezvous store):
#   launch/netns_cluster.sh up 2 1gbit
#   launch/netns_cluster.sh exec 1 env NNODES=2 NPROC=1 RDZV_IS_HOST=0 launch/multi_node.sh experiment=smoke &
#   launch/netns_cluster.sh exec 0 env NNODES=2 NPROC=1 RDZV_IS_HOST=1 launch/multi_node.sh experiment=smoke
#   launch/netns_cluster.sh down
#
# What it touches: only namespaces named fp8train-* (the nodes fp8train-n<I> and fp8train-hub, which holds
# the bridge and the switch-side end of every link). Every link is created inside those namespaces, so
# the machine's own network namespace, interfaces and routes are never changed, and traffic between
# nodes never leaves them. `up` removes a cluster left over by an earlier run first; callers that may
# run at the same time must serialise (tests/netns_utils.py holds a file lock).
set -euo pipefail

PREFIX=fp8train-
HUB=${PREFIX}hub
SUBNET=10.77.0
# tbf: a token bucket of BURST bytes refilled at RATE. It must hold at least RATE / HZ (one timer tick's
# bytes) for the link to reach RATE: 512 KiB covers 1 Gbit/s at HZ = 250 and 4 Gbit/s at HZ = 1000.
# LATENCY bounds how long a packet may queue before it is dropped (TCP then backs off, as it would on a
# congested switch port)
BURST=512kb
LATENCY=50ms

die() { echo "netns_cluster.sh: $*" >&2; exit 2; }
node_ns() { echo "${PREFIX}n$1"; }
node_addr() { echo "$SUBNET.$(( $1 + 1 ))"; }
our_namespaces() { ip netns list | awk '{print $1}' | grep "^$PREFIX" || true; }

require() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces and tc)"
  local tool
  for tool in ip tc; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found (install iproute2)"
  done
}

node_index() {  # validates I against the nodes that exist
  [[ "${1:-}" =~ ^[0-9]+$ ]] || die "node index must be a number, got '${1:-}'"
  ip netns list | awk '{print $1}' | grep -qx "$(node_ns "$1")" || die "node $1 does not exist (run up first)"
}

limit() {  # limit NAMESPACE DEV RATE: what leaves DEV is shaped to RATE
  [ "$3" = none ] || tc -n "$1" qdisc add dev "$2" root tbf rate "$3" burst $BURST latency $LATENCY
}

up() {
  local n=${1:-} rate=${2:-1gbit} i ns
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be 1..200, got '$n'"
  [[ "$rate" =~ ^[0-9]+(\.[0-9]+)?[kmgt]?(bit|bps)$ || "$rate" = none ]] ||
    die "RATE must be a tc rate such as 1gbit, 100mbit, 10gbit, or none; got '$rate'"
  down
  ip netns add "$HUB"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  for (( i = 0; i < n; i++ )); do
    ns=$(node_ns "$i")
    ip netns add "$ns"
    # the switch port p<I> stays in the hub; its peer goes straight into the node as eth0
    ip -n "$HUB" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set "p$i" master br0 up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    limit "$ns" eth0 "$rate"      # the node's uplink: what it sends
    limit "$HUB" "p$i" "$rate"    # its downlink: what the switch delivers to it (incast shares RATE)
  done
  for (( i = 0; i < n; i++ )); do printf '%s %s\n' "$(node_ns "$i")" "$(node_addr "$i")"; done
  echo "links: $rate each way"
}

down() {
  local ns
  for ns in $(our_namespaces); do ip netns del "$ns"; done
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) require; up "$@" ;;
  down) require; down ;;
  exec)
    require; node_index "${1:-}"; i=$1; shift
    [ $# -gt 0 ] || die "exec needs a command"
    exec ip netns exec "$(node_ns "$i")" env NODE_ADDR="$(node_addr "$i")" MASTER_ADDR="$(node_addr 0)" \
      NODE_INDEX="$i" GLOO_SOCKET_IFNAME=eth0 "$@" ;;
  pids) require; node_index "${1:-}"; ip netns pids "$(node_ns "$1")" ;;
  status) require; our_namespaces ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
