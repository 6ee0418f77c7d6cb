#!/usr/bin/env bash
# Train → register → evaluate → serve, on this machine:
#   1. start `gantry registry serve` (a token file with a fresh write token);
#   2. train a small model on tinyshakespeare that registers each committed checkpoint
#      ([registry] in job.toml) and moves `staging` to the newest;
#   3. evaluate shakespeare@staging at TP 1 and TP 2 from the registry (same perplexity,
#      both recorded on the version);
#   4. split `production` 90/10 between versions 2 and 3, generate through it (streamed and
#      not), and show the per-version request counts on /metrics;
#   5. mirror half of production's requests to version 1 as a shadow (answers compared,
#      never returned) and show how often the two agreed;
#   6. call the registry with the official OpenAI Python client (installed by setup):
#      list the models, complete, score a prompt (echo + logprobs), chat.
#
#   bash examples/registry-serving/run.sh
#
# Environment (all optional; CI runs every example with short settings):
#   GANTRY_BIN=PATH  use this gantry binary (e.g. target/debug/gantry) and skip setup's
#                    release build
#   STEPS=N          train N steps instead of 300 (a multiple of 3, at least 3: a checkpoint,
#                    hence a version, every N/3 steps)
#   RUN_DIR=DIR      write everything here instead of runs/registry-serving-<unix time>/
#
# Leaves the registry running only while the script runs; everything it writes is under
# runs/registry-serving-* (the database, the token file, checkpoints, the run).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

TEXT="$REPO/../shared/data/tinyshakespeare.txt"
[[ -f "$TEXT" ]] || { echo "run.sh: $TEXT is not there; this example trains on it" >&2; exit 1; }

# With GANTRY_BIN given, setup only checks what is installed; it builds nothing.
if [[ -n ${GANTRY_BIN:-} ]]; then GANTRY_SKIP_BUILD=1 bash scripts/setup.sh; else bash scripts/setup.sh; fi
G="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$G" ]] || { echo "run.sh: $G was not built" >&2; exit 1; }

DATA="data/tinyshakespeare"
if [[ ! -f "$DATA/manifest.json" ]]; then
    mkdir -p data
    "$G" data prepare --input "$TEXT" --output "$DATA" --vocab-size 512 --split-by blank-line
fi

STEPS="${STEPS:-300}"
if ! [[ $STEPS =~ ^[0-9]+$ ]] || ((STEPS < 3 || STEPS % 3 != 0)); then
    echo "run.sh: STEPS=$STEPS: give a multiple of 3 (three checkpoints make versions 1, 2, 3)" >&2
    exit 1
fi

WORK="${RUN_DIR:-runs/registry-serving-$(date +%s)}"
mkdir -p "$WORK"
GANTRY_REGISTRY_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export GANTRY_REGISTRY_TOKEN
printf 'write %s\n' "$GANTRY_REGISTRY_TOKEN" > "$WORK/tokens"

"$G" registry serve --listen 127.0.0.1:0 --db "$WORK/registry.redb" --token-file "$WORK/tokens" \
    > "$WORK/registry.out" 2> "$WORK/registry.log" &
REGISTRY_PID=$!
# Stop the registry and wait for it to exit, however the script ends.
trap 'kill $REGISTRY_PID 2>/dev/null || true; wait $REGISTRY_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "listening on" "$WORK/registry.out" 2>/dev/null && break
    sleep 0.1
done
ADDR=$(sed -n 's/^listening on //p' "$WORK/registry.out")
[[ -n $ADDR ]] || { echo "run.sh: the registry did not start; see $WORK/registry.log" >&2; exit 1; }
export GANTRY_REGISTRY="http://$ADDR"
echo "== registry at $GANTRY_REGISTRY"

echo "== training (each committed checkpoint becomes a version; staging follows the newest)"
"$G" launch examples/registry-serving/job.toml --local 2 --run-dir "$WORK/run" \
    --set registry.url="$GANTRY_REGISTRY" --set checkpoint.dir="$WORK/ckpt" \
    --set train.steps="$STEPS" --set checkpoint.every="$((STEPS / 3))"

echo "== evaluation from the registry at TP 1 and TP 2"
"$G" eval --model shakespeare@staging --data "$DATA" --tp 1
"$G" eval --model shakespeare@staging --data "$DATA" --tp 2

echo "== production: 90% version 2, 10% version 3"
"$G" models alias shakespeare production --split 2:90,3:10
for i in $(seq 20); do
    curl -s -X POST "$GANTRY_REGISTRY/v1/models/shakespeare@production/generate" \
        -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"ROMEO:\", \"max_tokens\": 24, \"temperature\": 0.8, \"seed\": $i}" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print("v%s: %r" % (r["version"], r["text"]))'
done

echo "== streamed (server-sent events) from staging (the first 8 lines)"
# The whole stream first, then its head: `curl | head -8` under pipefail fails the script
# (exit 23) when head exits before curl has written everything.
events=$(curl -sSN -X POST "$GANTRY_REGISTRY/v1/models/shakespeare@staging/generate" \
    -H 'Content-Type: application/json' \
    -d '{"prompt": "JULIET:", "max_tokens": 12, "temperature": 0.8, "seed": 7, "stream": true}')
sed -n 1,8p <<<"$events"

echo "== per-version requests on /metrics"
curl -s "$GANTRY_REGISTRY/metrics" | grep '^gantry_registry_generate_requests_total'
"$G" models show shakespeare@staging | python3 -c 'import json,sys; v=json.load(sys.stdin); print("evals on", v["model"], v["version"], ":", [(e["tp"], round(e["perplexity"], 4)) for e in v["evals"]])'

echo "== shadow: half of production's requests also go to version 1, compared off the request path"
"$G" models alias shakespeare production --split 2:90,3:10 --shadow 1:50
for i in $(seq 10); do
    curl -s -o /dev/null -X POST "$GANTRY_REGISTRY/v1/models/shakespeare@production/generate" \
        -H 'Content-Type: application/json' -d "{\"prompt\": \"ROMEO:\", \"max_tokens\": 8, \"temperature\": 0, \"seed\": $i}"
done
sleep 1 # the last mirrors finish after their primaries answered
curl -s "$GANTRY_REGISTRY/metrics" | grep '^gantry_registry_shadow_requests_total' || echo "(no shadow results yet)"

echo "== the OpenAI-compatible API, through the official openai client"
PY="${GANTRY_PY:-$REPO/.tools/py/bin/python}"
"$PY" - "$GANTRY_REGISTRY/v1" "$GANTRY_REGISTRY_TOKEN" <<'PY'
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
print("models:", [m.id for m in client.models.list().data])
c = client.completions.create(model="shakespeare@production", prompt="ROMEO:", max_tokens=16, temperature=0.8, seed=1)
print(f"completion from {c.system_fingerprint}: {c.choices[0].text!r}")
e = client.completions.create(model="shakespeare@staging", prompt="To be, or not to be", max_tokens=0, echo=True, logprobs=1)
lps = e.choices[0].logprobs.token_logprobs[1:]
print(f"log-likelihood of the prompt: {sum(lps):.3f} over {len(lps)} tokens")
chat = client.chat.completions.create(model="shakespeare@staging", messages=[{"role": "user", "content": "Speak, Juliet."}],
                                      max_tokens=24, temperature=0.8, seed=2)
print(f"chat: {chat.choices[0].message.content!r}")
PY
