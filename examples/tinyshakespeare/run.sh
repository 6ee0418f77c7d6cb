#!/usr/bin/env bash
# Train a small Llama-style model on Tiny Shakespeare on CPU and print two sampled
# continuations of validation text at the end.
#
#   bash examples/tinyshakespeare/run.sh [extra gantry launch arguments]
#
# Needs ../shared/data/tinyshakespeare.txt next to the repository (it is read in place, never
# copied); without it the script says so and exits 0. Works from any directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

TEXT="$REPO/../shared/data/tinyshakespeare.txt"
if [[ ! -f "$TEXT" ]]; then
    echo "tinyshakespeare: $TEXT is not there; nothing to do (put the text file there to run this example)."
    exit 0
fi

bash scripts/setup.sh
GANTRY="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$GANTRY" ]] || { echo "run.sh: $GANTRY was not built" >&2; exit 1; }

# A byte-level BPE with 512 tokens trained on the text itself; one document per
# blank-line-separated block (a speech).
DATA="data/tinyshakespeare"
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$GANTRY" data prepare --input "$TEXT" --output "$DATA" --vocab-size 512 --split-by blank-line
fi

exec "$GANTRY" launch examples/tinyshakespeare/job.toml --local 2 "$@"
