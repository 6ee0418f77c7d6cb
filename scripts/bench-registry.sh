#!/usr/bin/env bash
# scripts/bench-registry.sh: the registry service next to what it wraps, in one run.
#
#   bash scripts/bench-registry.sh [--json]
#
# 1. download   a DOWNLOAD_MIB-MiB checkpoint object fetched through the registry's
#               files route (HTTP, in-process client) vs read directly with std::fs,
#               warm page cache, REPEAT interleaved repetitions (medians, paired ratio).
# 2. generate   the quickstart model (examples/tiny-gpt-cpu: d128, 2 layers, seq 128),
#               trained for 50 steps here with a checkpoint, served by the registry:
#               REQUESTS requests of 16 prompt + 64 generated tokens at concurrency 1
#               and 8 (8 KV-cache slots): tokens/s, latency p50/p99, first token.
#
# Environment (defaults in brackets):
#   DOWNLOAD_MIB [1024]  REPEAT [5]  REQUESTS [32]
#   WORK [${TMPDIR:-/tmp}/gantry-bench-registry-<pid>]   scratch, removed at the end
#   GANTRY_SKIP_BUILD=1, GANTRY_BIN                      as for the other bench scripts
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_args "$@"

DOWNLOAD_MIB=${DOWNLOAD_MIB:-1024}
REPEAT=${REPEAT:-5}
REQUESTS=${REQUESTS:-32}
WORK=${WORK:-${TMPDIR:-/tmp}/gantry-bench-registry-$$}

bench_setup
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

DATA="data/synth-quickstart"
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$GANTRY_BIN" data synth --output "$DATA" --tokens 4000000 --vocab-size 128 --support 32 --seed 1 >&2
fi
log "training the quickstart model for 50 steps (checkpoint at the end)"
"$GANTRY_BIN" launch examples/tiny-gpt-cpu/job.toml --local 4 --set train.steps=50 \
    --run-dir "$WORK/run" --checkpoint-dir "$WORK/ckpt" >&2

ARGS=(bench registry --checkpoint "$WORK/ckpt" --download-mib "$DOWNLOAD_MIB" --repeat "$REPEAT"
    --requests "$REQUESTS" --concurrency 1,8 --work "$WORK/bench")
[[ $JSON == 1 ]] && ARGS+=(--json)
"$GANTRY_BIN" "${ARGS[@]}"
