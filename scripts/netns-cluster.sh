#!/usr/bin/env bash
# scripts/netns-cluster.sh: a cluster of N hosts on this machine, by hand, as the tests build it
# (gantry-testkit's netns harness: testkit/src/netns/). Needs root and iproute2.
#
#   bash scripts/netns-cluster.sh up [N]          N hosts h0..h(N-1) (default 3); prints how to use them
#   bash scripts/netns-cluster.sh exec HOST CMD…  run CMD inside HOST (its network, its host name)
#   bash scripts/netns-cluster.sh list            harness namespaces on this machine (tests' too)
#   bash scripts/netns-cluster.sh sweep           remove namespaces of test processes that are gone
#   bash scripts/netns-cluster.sh down            remove this script's cluster (also: --down)
#
# Layout (same names, addresses and lock as the Rust harness; keep them in step with
# testkit/src/netns/names.rs and mod.rs):
#   - one /24 of the benchmarking range 198.18.0.0/15 per cluster, numbered K in 0..512:
#     198.(18 + K/256).(K%256).0/24; host i is .(i+1), interface eth0, no default route;
#   - namespaces gtn<K>-<owner>-sw (the switch: bridge br0 and ports p<i>, no address) and
#     gtn<K>-<owner>-h<i>; owner is the test's pid, or `sh` for this script. The namespaces are
#     the subnet claim: a K is free when no namespace carries it;
#   - /run/gantry-netns.lock (flock) is held while picking K and making namespaces;
#   - IPv6 is off in every namespace, so only these IPv4 addresses carry traffic.
# The script's cluster lives until `down`; tests' clusters are removed by their process, by a
# watchdog when it is killed, or by the next `sweep` (every test sweeps as it starts).
set -euo pipefail

LOCK=/run/gantry-netns.lock
OWNER=sh

die() { printf 'netns-cluster: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces need CAP_SYS_ADMIN)"
    command -v ip >/dev/null || die "\`ip\` (iproute2) is not installed"
}

take_lock() {
    exec 9>"$LOCK"
    flock 9
}

namespaces() { ls /run/netns 2>/dev/null || true; }

# The script's namespaces (any K).
ours() { namespaces | grep -E "^gtn[0-9]+-$OWNER-(sw|h[0-9]+)$" || true; }

sweep_locked() {
    local ns pid
    for ns in $(namespaces | grep -E '^gtn[0-9]+-[0-9]+-(sw|h[0-9]+)$' || true); do
        pid=${ns#gtn*-}
        pid=${pid%%-*}
        if ! kill -0 "$pid" 2>/dev/null; then
            ip netns del "$ns" 2>/dev/null && echo "swept $ns"
        fi
    done
}

addr() { # K I -> address of host I in subnet K
    echo "198.$((18 + $1 / 256)).$(($1 % 256)).$(($2 + 1))"
}

no_ipv6() {
    ip netns exec "$1" sh -c 'for c in default all; do
        f=/proc/sys/net/ipv6/conf/$c/disable_ipv6; [ -e "$f" ] && echo 1 > "$f"; done; true'
}

up() {
    local n=${1:-3}
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 250 ]] || die "host count must be 1 to 250, got $n"
    need_root
    take_lock
    sweep_locked
    [[ -z $(ours) ]] || die "a cluster of this script exists already ($(ours | tr '\n' ' ')); run \`$0 down\` first"
    local used k start
    used=" $(namespaces | sed -nE 's/^gtn([0-9]+)-.*/\1/p' | sort -u | tr '\n' ' ') "
    start=$(($$ % 512))
    k=
    for i in $(seq 0 511); do
        local c=$(((start + i) % 512))
        if [[ $used != *" $c "* ]]; then k=$c; break; fi
    done
    [[ -n $k ]] || die "every /24 of 198.18.0.0/15 is in use"
    local sw="gtn$k-$OWNER-sw"
    ip netns add "$sw"
    no_ipv6 "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for i in $(seq 0 $((n - 1))); do
        local h="gtn$k-$OWNER-h$i"
        ip netns add "$h"
        no_ipv6 "$h"
        ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$h"
        ip -n "$sw" link set "p$i" master br0 up
        ip -n "$h" addr add "$(addr "$k" "$i")/24" dev eth0
        ip -n "$h" link set eth0 up
        ip -n "$h" link set lo up
    done
    flock -u 9
    echo "cluster gtn$k: $n hosts on 198.$((18 + k / 256)).$((k % 256)).0/24"
    for i in $(seq 0 $((n - 1))); do
        echo "  h$i  $(addr "$k" "$i")  namespace gtn$k-$OWNER-h$i"
    done
    cat <<EOF

Run something in a host (its own network and host name; ranks on h0 and h1 then use TCP):
  bash $0 exec h0 target/debug/gantry coordinator --listen $(addr "$k" 0):7070 --token T --state /tmp/c
  bash $0 exec h1 target/debug/gantry worker --coordinator $(addr "$k" 0):7070 --token T --state /tmp/w1
Partition h1 (pull its cable at the switch) and heal it:
  ip -n $sw link set p1 down;  ip -n $sw link set p1 up
Rate-limit h1 to 100 Mbit/s each way (and \`tc … qdisc del dev … root\` to lift it):
  tc -n gtn$k-$OWNER-h1 qdisc replace dev eth0 root tbf rate 100mbit burst 128kb latency 100ms
  tc -n $sw qdisc replace dev p1 root tbf rate 100mbit burst 128kb latency 100ms
Remove it all:
  bash $0 down
EOF
}

exec_in() {
    local host=${1:-}
    shift || true
    [[ $host =~ ^h[0-9]+$ ]] || die "usage: $0 exec HOST CMD… (HOST is h0, h1, …)"
    [[ $# -gt 0 ]] || die "usage: $0 exec HOST CMD…"
    need_root
    local ns
    ns=$(ours | grep -E -- "-$host\$" | head -1)
    [[ -n $ns ]] || die "no host $host: run \`$0 up\` first"
    command -v unshare >/dev/null || die "\`unshare\` (util-linux) is not installed"
    # A UTS namespace per process, named after the host: gantry tells hosts apart by name.
    exec ip netns exec "$ns" unshare --uts sh -c 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"' "$host" "$@"
}

down() {
    need_root
    take_lock
    local ns found=0
    # The switch first: it takes every cable with it.
    for ns in $(ours | sort -t- -k3,3r); do
        ip netns del "$ns" && echo "removed $ns"
        found=1
    done
    [[ $found -eq 1 ]] || echo "no cluster of this script"
}

case ${1:-} in
    up) shift; up "$@" ;;
    exec) shift; exec_in "$@" ;;
    list) namespaces | grep -E '^gtn[0-9]+-' || true ;;
    sweep) need_root; take_lock; sweep_locked ;;
    down | --down) down ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
