#!/usr/bin/env bash
# scripts/bench-transports.sh: all_reduce over plain TCP, TLS 1.3 and QUIC, side by side in one
# run: bus bandwidth at 64 MiB and 256 MiB and the latency of a 1 KiB all_reduce, 2 ranks,
#   - on loopback (one host: GANTRY_TRANSPORT=tcp|tls|quic forces the link), and
#   - across two network namespaces (two hosts on a veth bridge, MTU 1500, as the namespace
#     tests build them: GANTRY_TRANSPORT=auto GANTRY_INTER_HOST=tcp|tls|quic). Needs root; the
#     rows are skipped with a line saying why when namespaces cannot be made.
# Rounds alternate the transports (ROUNDS, default 3); each figure is the median over rounds,
# and the ratio column is the median of per-round ratios against TCP in the same place.
#
#   bash scripts/bench-transports.sh [--json]
# Environment: GANTRY_BIN (default target/release/gantry, built by setup), ROUNDS, ITERS (timed
# iterations per size, default 10), SIZES (default 1K,64M,256M), TRANSPORTS (default "tcp tls quic").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_args "$@"
if [[ -n ${GANTRY_BIN:-} ]]; then
    [[ -x $GANTRY_BIN ]] || die "$GANTRY_BIN is not executable"
else
    bench_setup
fi
ROUNDS=${ROUNDS:-3}
ITERS=${ITERS:-10}
SIZES=${SIZES:-1K,64M,256M}
read -r -a TRANSPORTS <<<"${TRANSPORTS:-tcp tls quic}"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"; [[ -n ${CLUSTER_UP:-} ]] && bash scripts/netns-cluster.sh down >/dev/null 2>&1 || true' EXIT

loopback() { # TRANSPORT ROUND
    GANTRY_TRANSPORT=$1 "$GANTRY_BIN" bench collectives --world 2 --transport "$1" \
        --sizes "$SIZES" --iters "$ITERS" --warmup 3 --json | sed "s/^/{\"place\":\"loopback\",\"round\":$2,\"row\":/; s/\$/}/"
}

# Two hosts: rank 0 on h0 (serving the store), rank 1 on h1; one secret for both.
across() { # TRANSPORT ROUND
    local secret master port=29600
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    master=$(awk '$1 == "h0" {print $2}' "$OUT/cluster")
    local common=(env WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR="$master" MASTER_PORT=$port
        GANTRY_JOB_SECRET="$secret" GANTRY_TRANSPORT=auto GANTRY_INTER_HOST="$1")
    local args=(bench collectives --sizes "$SIZES" --iters "$ITERS" --warmup 3 --json)
    bash scripts/netns-cluster.sh exec h1 "${common[@]}" RANK=1 "$GANTRY_BIN" "${args[@]}" >/dev/null &
    local other=$!
    bash scripts/netns-cluster.sh exec h0 "${common[@]}" RANK=0 "$GANTRY_BIN" "${args[@]}" |
        sed "s/^/{\"place\":\"two hosts\",\"round\":$2,\"row\":/; s/\$/}/"
    wait "$other"
}

CROSS=1
if [[ $(id -u) -ne 0 ]] || ! command -v ip >/dev/null; then
    log "skipping the two-host rows: network namespaces need root and iproute2"
    CROSS=0
elif ! bash scripts/netns-cluster.sh up 2 >"$OUT/cluster" 2>&1; then
    log "skipping the two-host rows: $(tail -n1 "$OUT/cluster")"
    CROSS=0
else
    CLUSTER_UP=1
fi

for round in $(seq 1 "$ROUNDS"); do
    for t in "${TRANSPORTS[@]}"; do
        log "round $round/$ROUNDS: $t on loopback"
        loopback "$t" "$round" >>"$OUT/rows.jsonl"
        if [[ $CROSS -eq 1 ]]; then
            log "round $round/$ROUNDS: $t across two hosts"
            across "$t" "$round" >>"$OUT/rows.jsonl"
        fi
    done
done

python3 - "$OUT/rows.jsonl" "$JSON" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
as_json = sys.argv[2] == "1"
by = {}
for r in rows:
    row = r["row"]
    if not row["ok"]:
        sys.exit(f"a {row['transport']} all_reduce of {row['bytes']} bytes came out wrong")
    # The transport the ranks reported using, e.g. "tls": the place decides how it was asked.
    key = (r["place"], row["bytes"])
    by.setdefault(key, {}).setdefault(r["round"], {})[row["transport"]] = row
out = []
for (place, size), rounds in sorted(by.items()):
    for t in ["tcp", "tls", "quic"]:
        mine = [rs[t] for rs in rounds.values() if t in rs]
        if not mine:
            continue
        metric = "time_us" if size <= 64 << 10 else "busbw_gbps"
        val = statistics.median(m[metric] for m in mine)
        ratios = [rs[t][metric] / rs["tcp"][metric] for rs in rounds.values() if t in rs and "tcp" in rs]
        out.append({"place": place, "bytes": size, "transport": t, metric: val,
                    "vs_tcp": statistics.median(ratios) if ratios else None, "rounds": len(mine)})
if as_json:
    for o in out:
        print(json.dumps(o))
    sys.exit()
print("# vs tcp: bus bandwidth / TCP's (higher is better); on latency rows latency / TCP's (lower is better)")
print(f"{'place':<10} {'size':>10} {'transport':>9} {'busbw GB/s':>11} {'latency us':>11} {'vs tcp':>8}")
for o in out:
    size = o["bytes"]
    label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
    bw = f"{o['busbw_gbps']:.3f}" if "busbw_gbps" in o else ""
    lat = f"{o['time_us']:.1f}" if "time_us" in o else ""
    print(f"{o['place']:<10} {label:>10} {o['transport']:>9} {bw:>11} {lat:>11} {o['vs_tcp']:>7.2f}x")
EOF
