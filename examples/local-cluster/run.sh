#!/usr/bin/env bash
# A whole cluster on this machine: one coordinator and two worker daemons (2 slots each) on
# loopback, the tiny GPT submitted as a job (examples/local-cluster/job.toml), its progress
# shown until it finishes, then the job's record and the workers.
#
#   bash examples/local-cluster/run.sh             # setup, data, cluster, job
#   KILL_RANK=1 bash examples/local-cluster/run.sh # also SIGKILL rank 1 at step 120: watch
#                                                  # the job restart from its checkpoint
#
# Environment (all optional; CI runs every example with short settings):
#   GANTRY_BIN=PATH  use this gantry binary (e.g. target/debug/gantry) and skip setup's
#                    release build
#   STEPS=N          train N steps instead of job.toml's 400 (KILL_RANK needs N > 120)
#   RUN_DIR=DIR      state, logs and checkpoints go here instead of runs/local-cluster/
#
# State, logs and checkpoints go to runs/local-cluster/ (removed at the start of each run).
# The daemons stop when the script ends.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

# With GANTRY_BIN given, setup only checks what is installed; it builds nothing.
if [[ -n ${GANTRY_BIN:-} ]]; then GANTRY_SKIP_BUILD=1 bash scripts/setup.sh; else bash scripts/setup.sh; fi
GANTRY="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$GANTRY" ]] || { echo "run.sh: $GANTRY was not built" >&2; exit 1; }

DATA="data/synth-quickstart"
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$GANTRY" data synth --output "$DATA" --tokens 4000000 --vocab-size 128 --support 32 --seed 1
fi

DIR="${RUN_DIR:-runs/local-cluster}"
rm -rf "$DIR"
mkdir -p "$DIR"
export GANTRY_TOKEN
GANTRY_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# `exec`: the coproc's pid is then the coordinator's own, so cleanup stops the daemon itself
# (killing the subshell around it would leave the coordinator running).
coproc COORD { exec "$GANTRY" coordinator --listen 127.0.0.1:0 --state "$DIR/coordinator" 2>"$DIR/coordinator.log"; }
PIDS+=("$COORD_PID")
read -r line <&"${COORD[0]}"
export GANTRY_COORDINATOR=${line#listening on }
echo "coordinator at $GANTRY_COORDINATOR (log $DIR/coordinator.log)"

for i in 1 2; do
    "$GANTRY" worker --name "node$i" --slots 2 --state "$DIR/node$i" \
        --ports "$((30000 + i * 100))-$((30000 + i * 100 + 99))" >/dev/null 2>"$DIR/node$i.log" &
    PIDS+=("$!")
done
until [[ $("$GANTRY" workers --json | grep -o '"alive":true' | wc -l) -eq 2 ]]; do sleep 0.2; done
"$GANTRY" workers

SETTINGS=()
if [[ -n ${RUN_DIR:-} ]]; then SETTINGS+=(--set checkpoint.dir="$DIR/checkpoints"); fi
if [[ -n ${STEPS:-} ]]; then SETTINGS+=(--set train.steps="$STEPS"); fi
ID=$("$GANTRY" submit examples/local-cluster/job.toml ${SETTINGS[@]+"${SETTINGS[@]}"})
echo "submitted job $ID; follow a rank with: GANTRY_COORDINATOR=$GANTRY_COORDINATOR gantry logs $ID --rank 0 --follow"

killed=0
while :; do
    json=$("$GANTRY" job "$ID" --json)
    state=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' <<<"$json" | tail -n1)
    step=$(grep -o '"step": *[0-9]*' <<<"$json" | grep -o '[0-9]*$' | sort -n | head -n1 || true)
    echo "job $ID: $state, step ${step:-0}"
    if [[ ${KILL_RANK:-} != "" && $killed == 0 && ${step:-0} -ge 120 ]]; then
        pid=$("$GANTRY" job "$ID" --json | tr -d '\n ' | grep -o "\"pid\":[0-9]*" | sed -n "$((KILL_RANK + 1))p" | cut -d: -f2)
        echo "SIGKILL rank $KILL_RANK (pid $pid)"
        kill -9 "$pid"
        killed=1
    fi
    case $state in succeeded | failed | cancelled) break ;; esac
    sleep 3
done
"$GANTRY" job "$ID"
[[ $state == succeeded ]]
