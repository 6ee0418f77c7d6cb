#!/usr/bin/env bash
# Train a small Llama-style model on Tiny Shakespeare on CPU and print two sampled
# continuations of validation text at the end.
#
#   bash examples/tinyshakespeare/run.sh [extra gantry launch arguments]
#
# Needs ../shared/data/tinyshakespeare.txt next to the repository (it is read in place, never
# copied); without it the script says so and exits 0. Works from any directory.
#
# Environment (all optional; CI runs every example with short settings):
#   GANTRY_BIN=PATH  use this gantry binary (e.g. target/debug/gantry) and skip setup's
#                    release build
#   STEPS=N          train N steps instead of job.toml's 500 (--set train.steps=N)
#   RUN_DIR=DIR      the run directory instead of runs/tinyshakespeare-<unix time>/ (--run-dir DIR)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

TEXT="$REPO/../shared/data/tinyshakespeare.txt"
if [[ ! -f "$TEXT" ]]; then
    echo "tinyshakespeare: $TEXT is not there; nothing to do (put the text file there to run this example)."
    exit 0
fi

# With GANTRY_BIN given, setup only checks what is installed; it builds nothing.
if [[ -n ${GANTRY_BIN:-} ]]; then GANTRY_SKIP_BUILD=1 bash scripts/setup.sh; else bash scripts/setup.sh; fi
GANTRY="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$GANTRY" ]] || { echo "run.sh: $GANTRY was not built" >&2; exit 1; }

# A byte-level BPE with 512 tokens trained on the text itself; one document per
# blank-line-separated block (a speech).
DATA="data/tinyshakespeare"
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$GANTRY" data prepare --input "$TEXT" --output "$DATA" --vocab-size 512 --split-by blank-line
fi

SETTINGS=()
if [[ -n ${STEPS:-} ]]; then SETTINGS+=(--set train.steps="$STEPS"); fi
if [[ -n ${RUN_DIR:-} ]]; then SETTINGS+=(--run-dir "$RUN_DIR"); fi
exec "$GANTRY" launch examples/tinyshakespeare/job.toml ${SETTINGS[@]+"${SETTINGS[@]}"} --local 2 "$@"
