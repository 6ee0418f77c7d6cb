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
# 3. peer       (PEER=1) the same model exported with `gantry checkpoint export`, loaded
#               by Hugging Face transformers (bench/peers/hf_generate.py, the torch peer
#               venv) and run with `model.generate` on the same prompts; both sides
#               greedy (the gantry requests then use temperature 0), side by side with
#               the ratio gantry / transformers.
#
# Environment (defaults in brackets):
#   DOWNLOAD_MIB [1024]  REPEAT [5]  REQUESTS [32]  PEER [0]
#   THREADS [1]   libtorch threads of both sides in the PEER comparison (on a busy
#                 2-core machine, 2 spinning OpenMP threads per side slow either 10x)
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
PEER=${PEER:-0}
THREADS=${THREADS:-1}
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
if [[ $PEER != 1 ]]; then
    [[ $JSON == 1 ]] && ARGS+=(--json)
    "$GANTRY_BIN" "${ARGS[@]}"
    exit 0
fi

torch_peer_python
log "exporting the checkpoint for transformers"
"$GANTRY_BIN" checkpoint export "$WORK/ckpt" --out "$WORK/hf" >&2
"$GANTRY_BIN" "${ARGS[@]}" --temperature 0 --threads "$THREADS" --json >"$WORK/gantry.json"
log "transformers generate on the same prompts"
"$TORCH_PY" bench/peers/hf_generate.py "$WORK/hf" --requests "$REQUESTS" --concurrency 1,8 \
    --threads "$THREADS" >"$WORK/peer.json"
python3 - "$WORK/gantry.json" "$WORK/peer.json" "$JSON" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))["generation"]
p = json.load(open(sys.argv[2]))
rows = []
for gr, pr in zip(g["runs"], p["runs"]):
    rows.append({"concurrency": gr["concurrency"], "gantry": gr, "transformers": pr,
                 "ratio_tokens_per_s": gr["tokens_per_s"] / pr["tokens_per_s"]})
if sys.argv[3] == "1":
    print(json.dumps({"generation": g, "peer": p, "rows": rows}))
    sys.exit(0)
print(f"greedy generation, {g['prompt_tokens']} prompt + {g['max_tokens']} new tokens, {g['runs'][0]['requests']} requests, CPU, torch threads {p['threads']}")
print("  concurrency  gantry tok/s  p50 ms  p99 ms | transformers tok/s  p50 ms  p99 ms | ratio")
for r in rows:
    a, b = r["gantry"], r["transformers"]
    print(f"  {r['concurrency']:>11}  {a['tokens_per_s']:>12.0f}  {a['latency_p50_ms']:>6.1f}  {a['latency_p99_ms']:>6.1f} |"
          f" {b['tokens_per_s']:>18.0f}  {b['latency_p50_ms']:>6.1f}  {b['latency_p99_ms']:>6.1f} | {r['ratio_tokens_per_s']:.2f}")
PY
