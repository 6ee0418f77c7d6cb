#!/usr/bin/env bash
# scripts/bench-train-cpu.sh: CPU training throughput of `gantry launch` per parallel layout.
#
#   bash scripts/bench-train-cpu.sh [--skip-setup] [--only tiny|20m] [--tiny-steps N] [--big-steps N]
#
# Two GPT-2 style models on synthetic tokens, every layout (dp, tp, pp) in
#   (1,1,1) (2,1,1) (1,2,1) (1,1,2) (2,2,1)        and (2,2,2) for the tiny model,
# each for a fixed small number of steps, all ranks as local processes on this host
# (`gantry launch --local dp·tp·pp`, intra-op threads = cores / ranks, at least 1). Prints one
# table row per run:
#   tokens/s    mean over the steps after the first (the run's summary.json)
#   step ms     mean step time over the same steps
#   update ms   the part of it after backward: gradient wait, norm, clipping, AdamW (mean)
#   comm share  share of step time the reporting rank (dp 0, tp 0, last stage) spent blocked
#               in communication: transfers *and* waiting for slower peers, which on an
#               oversubscribed host (more ranks than cores) includes waiting for CPU time
#
# Models (synthetic Markov-chain tokens from `gantry data synth`):
#   tiny  examples/tiny-gpt-cpu/job.toml on its 128-token data (data/synth-quickstart):
#         d 128, 2 layers, 4 heads, seq 128, 429,568 parameters; global batch 32
#         (micro-batch 8), 20 steps by default
#   20m   d 512, 6 layers, 8 heads, seq 256, 512-token data (data/synth-bench-512), tied:
#         19,308,544 parameters; global batch 8 (micro-batch 2), 6 steps by default
# GANTRY_BIN overrides the binary (default target/release/gantry, built by setup).
# The same global batch per model for every layout, so tokens/s compare directly.
# Runs go to runs/bench-train-cpu/<model>-<dp><tp><pp>/ (metrics.jsonl, summary.json, logs).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

SKIP_SETUP=0
ONLY=""
TINY_STEPS=20
BIG_STEPS=6
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-setup) SKIP_SETUP=1 ;;
        --only) ONLY="$2"; shift ;;
        --tiny-steps) TINY_STEPS="$2"; shift ;;
        --big-steps) BIG_STEPS="$2"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench-train-cpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ $SKIP_SETUP -eq 0 ]]; then
    bash scripts/setup.sh
fi
GANTRY="${GANTRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/gantry}"
[[ -x "$GANTRY" ]] || { echo "bench-train-cpu.sh: $GANTRY missing (run scripts/setup.sh)" >&2; exit 1; }

TINY_DATA="data/synth-quickstart"
BIG_DATA="data/synth-bench-512"
[[ -f "$TINY_DATA/manifest.json" ]] ||
    "$GANTRY" data synth --output "$TINY_DATA" --tokens 4000000 --vocab-size 128 --support 32 --seed 1
[[ -f "$BIG_DATA/manifest.json" ]] ||
    "$GANTRY" data synth --output "$BIG_DATA" --tokens 4000000 --vocab-size 512 --seed 1

OUT="runs/bench-train-cpu"
mkdir -p "$OUT"

# json_field FILE KEY: a number from the rank's pretty-printed summary.json.
json_field() {
    sed -n "s/^ *\"$2\": *\([-0-9.eE+]*\),\{0,1\}$/\1/p" "$1" | head -n 1 || true
}

CORES="$(nproc)"
printf '# %s, %s cores, %s\n' "$(uname -n)" "$CORES" "$(date -u +%Y-%m-%dT%H:%MZ)"
printf '%-6s %-12s %6s %10s %10s %10s %10s %8s\n' model "dp×tp×pp" ranks params "tokens/s" "step ms" "update ms" "comm %"

run_one() { # model spec steps dp tp pp extra-overrides...
    local model="$1" spec="$2" steps="$3" dp="$4" tp="$5" pp="$6"
    shift 6
    local n=$((dp * tp * pp))
    local dir="$OUT/$model-$dp$tp$pp"
    local log="$OUT/$model-$dp$tp$pp.launch.log"
    if ! "$GANTRY" launch "$spec" --local "$n" --run-dir "$dir" \
        --set "parallel.dp=$dp" --set "parallel.tp=$tp" --set "parallel.pp=$pp" \
        --set "parallel.stage_layers=[]" --set "parallel.zero1=false" \
        --set "train.steps=$steps" --set train.eval_every=0 --set train.eval_batches=1 \
        --set train.sample_tokens=0 --set "name=\"bench-$model\"" "$@" >"$log" 2>&1; then
        printf '%-6s %-12s %6s  FAILED, see %s\n' "$model" "${dp}×${tp}×${pp}" "$n" "$log"
        return 0
    fi
    local s="$dir/summary.json" params
    # summary.json has the parameter count; the launcher's first line too.
    params="$(json_field "$s" params)"
    awk -v m="$model" -v l="${dp}×${tp}×${pp}" -v n="$n" -v p="${params:-?}" \
        -v tps="$(json_field "$s" mean_tokens_per_s)" -v ms="$(json_field "$s" mean_step_ms)" \
        -v c="$(json_field "$s" comm_share)" -v u="$(json_field "$s" mean_update_ms)" \
        'BEGIN { printf "%-6s %-12s %6s %10s %10.0f %10.1f %10.1f %7.0f%%\n", m, l, n, p, tps, ms, u, 100 * c }'
}

TINY_LAYOUTS=("1 1 1" "2 1 1" "1 2 1" "1 1 2" "2 2 1" "2 2 2")
BIG_LAYOUTS=("1 1 1" "2 1 1" "1 2 1" "1 1 2" "2 2 1")

if [[ -z "$ONLY" || "$ONLY" == tiny ]]; then
    for l in "${TINY_LAYOUTS[@]}"; do
        # shellcheck disable=SC2086
        run_one tiny examples/tiny-gpt-cpu/job.toml "$TINY_STEPS" $l \
            --set "data.path=$TINY_DATA" --set train.global_batch=32 --set train.micro_batch=8
    done
fi
if [[ -z "$ONLY" || "$ONLY" == 20m ]]; then
    for l in "${BIG_LAYOUTS[@]}"; do
        # shellcheck disable=SC2086
        run_one 20m examples/tiny-gpt-cpu/job.toml "$BIG_STEPS" $l \
            --set "data.path=$BIG_DATA" --set model.vocab_size=512 --set model.d_model=512 \
            --set model.n_layers=6 --set model.n_heads=8 --set model.seq_len=256 \
            --set optim.lr=6e-4 --set optim.min_lr=6e-5 --set optim.warmup_steps=2 \
            --set train.global_batch=8 --set train.micro_batch=2
    done
fi
