#!/usr/bin/env bash
# The quickstart: set up, make synthetic data, train a tiny GPT on CPU with dp=2 × tp=2
# (4 local rank processes), and print the validation loss next to the data's entropy floor.
#
#   bash examples/tiny-gpt-cpu/run.sh [extra gantry launch arguments, e.g. --set train.steps=100]
#
# Works from any directory; everything is relative to the repository root. Idempotent: setup
# and the data step do nothing when their work is done. Each run writes runs/tiny-gpt-cpu-<time>/.
#
# Environment (all optional; CI runs every example with short settings):
#   GANTRY_BIN=PATH  use this gantry binary (e.g. target/debug/gantry) and skip setup's
#                    release build
#   STEPS=N          train N steps instead of job.toml's 400 (--set train.steps=N)
#   RUN_DIR=DIR      the run directory instead of runs/tiny-gpt-cpu-<unix time>/ (--run-dir DIR)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

# Installs what is missing (libtorch, toolchain pieces) and builds target/release/gantry
# (with GANTRY_BIN given, it only checks what is installed and builds nothing).
if [[ -n ${GANTRY_BIN:-} ]]; then GANTRY_SKIP_BUILD=1 bash scripts/setup.sh; else bash scripts/setup.sh; fi

GANTRY="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$GANTRY" ]] || { echo "run.sh: $GANTRY was not built" >&2; exit 1; }

DATA="data/synth-quickstart"
if [[ -f "$DATA/manifest.json" ]] && ! grep -q '"vocab_size": 128,' "$DATA/manifest.json"; then
    echo "run.sh: $DATA exists but is not the 128-token quickstart data; remove it or change data.path" >&2
    exit 1
fi
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$GANTRY" data synth --output "$DATA" --tokens 4000000 --vocab-size 128 --support 32 --seed 1
fi

SETTINGS=()
if [[ -n ${STEPS:-} ]]; then SETTINGS+=(--set train.steps="$STEPS"); fi
if [[ -n ${RUN_DIR:-} ]]; then SETTINGS+=(--run-dir "$RUN_DIR"); fi
exec "$GANTRY" launch examples/tiny-gpt-cpu/job.toml ${SETTINGS[@]+"${SETTINGS[@]}"} --local 4 "$@"
