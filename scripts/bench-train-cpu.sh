#!/usr/bin/env bash
# scripts/bench-train-cpu.sh: CPU training throughput of `gantry launch` per parallel layout.
#
#   bash scripts/bench-train-cpu.sh [--skip-setup] [--only tiny|20m] [--tiny-steps N] [--big-steps N]
#   bash scripts/bench-train-cpu.sh --peer [--skip-setup] [--only tiny|20m] [--tiny-steps N] [--big-steps N]
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
#
# --peer: gantry against PyTorch eager (bench/peers/torch_gpt_train.py: the same GPT-2, init
# distributions, AdamW with the same decay groups, clipping, lr schedule, batch shape, data and
# threads, fp32, fused AdamW) instead of the layout table. Per model, two cases:
#   1 rank   gantry 1×1×1 (one process, cores threads) vs one eager process
#   dp 2     gantry 2×1×1 (two processes, cores/2 threads each) vs gloo DDP with 2 ranks,
#            started by the peer itself (`--spawn 2`: torch.multiprocessing.spawn), or with
#            PEER_DDP_LAUNCH=torchrun by `python -m torch.distributed.run --standalone
#            --nproc-per-node 2`. spawn is the default because torchrun starts every worker in
#            a session of its own (start_new_session) while gantry's ranks share the
#            launcher's: where the kernel groups by session (sched_autogroup_enabled=1, as on
#            the development VM) and other sessions keep the cores busy, torchrun's ranks then
#            get a fair share each and gantry's ranks one share between them, which says
#            nothing about either runtime. spawn's ranks share the session, as gantry's do.
# each case ROUNDS times (default 3), gantry and the peer alternating (odd rounds gantry first,
# even rounds the peer first). The peer reads gantry's resolved spec.toml of the same case (so
# sizes, vocabulary after padding, optimizer, batch, steps and threads are gantry's) and runs
# with the OMP_WAIT_POLICY gantry's rank 0 logged for that case (unset when it kept libgomp's
# default). Prints per case: medians of tokens/s (gantry, peer), gantry/peer at the medians,
# the median of the per-round ratios, and the first/last loss of the last round of each.
# Steps default to 30 (tiny) and 8 (20m) here: about 10 minutes on 2 cores. gantry runs its
# fused operators (GANTRY_FUSED_OPS, default on; train/src/fused_ops.rs) unless the caller's
# environment says off; the header line prints which.
# Needs a Python where `import torch` works: TORCH_PYTHON, or .tools/torch-peer (made on first
# use, scripts/bench-lib.sh: torch_peer_python). Runs go to runs/bench-train-cpu/peer/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

SKIP_SETUP=0
ONLY=""
TINY_STEPS=""
BIG_STEPS=""
PEER=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-setup) SKIP_SETUP=1 ;;
        --peer) PEER=1 ;;
        --only) ONLY="$2"; shift ;;
        --tiny-steps) TINY_STEPS="$2"; shift ;;
        --big-steps) BIG_STEPS="$2"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench-train-cpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $PEER -eq 1 ]]; then
    TINY_STEPS="${TINY_STEPS:-30}"
    BIG_STEPS="${BIG_STEPS:-8}"
else
    TINY_STEPS="${TINY_STEPS:-20}"
    BIG_STEPS="${BIG_STEPS:-6}"
fi

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

# The models: `--set` overrides of examples/tiny-gpt-cpu/job.toml (see the header).
TINY_SET=(--set "data.path=$TINY_DATA" --set train.global_batch=32 --set train.micro_batch=8)
BIG_SET=(--set "data.path=$BIG_DATA" --set model.vocab_size=512 --set model.d_model=512
    --set model.n_layers=6 --set model.n_heads=8 --set model.seq_len=256
    --set optim.lr=6e-4 --set optim.min_lr=6e-5 --set optim.warmup_steps=2
    --set train.global_batch=8 --set train.micro_batch=2)

# launch_gantry MODEL SPEC DIR LOG STEPS DP TP PP extra-overrides...: one `gantry launch
# --local` run of SPEC with the layout and the overrides, its output in LOG.
launch_gantry() {
    local model="$1" spec="$2" dir="$3" log="$4" steps="$5" dp="$6" tp="$7" pp="$8"
    shift 8
    "$GANTRY" launch "$spec" --local $((dp * tp * pp)) --run-dir "$dir" \
        --set "parallel.dp=$dp" --set "parallel.tp=$tp" --set "parallel.pp=$pp" \
        --set "parallel.stage_layers=[]" --set "parallel.zero1=false" \
        --set "train.steps=$steps" --set train.eval_every=0 --set train.eval_batches=1 \
        --set train.sample_tokens=0 --set "name=\"bench-$model\"" "$@" >"$log" 2>&1
}

# ------------------------------------------------------------------ --peer: gantry vs eager
if [[ $PEER -eq 1 ]]; then
    # shellcheck source=scripts/bench-lib.sh
    source scripts/bench-lib.sh
    torch_peer_python
    ROUNDS="${ROUNDS:-3}"
    PEER_DDP_LAUNCH="${PEER_DDP_LAUNCH:-spawn}"
    [[ $PEER_DDP_LAUNCH == spawn || $PEER_DDP_LAUNCH == torchrun ]] ||
        die "PEER_DDP_LAUNCH=$PEER_DDP_LAUNCH: expected spawn or torchrun"
    PEER_OUT="$OUT/peer"
    mkdir -p "$PEER_OUT"
    printf '# %s, %s cores, %s, load average %s; gantry %s (GANTRY_FUSED_OPS=%s); peer %s (torch %s), DDP ranks by %s\n' \
        "$(uname -n)" "$CORES" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$GANTRY" \
        "${GANTRY_FUSED_OPS:-default}" "$TORCH_PY" "$("$TORCH_PY" -c 'import torch; print(torch.__version__)')" \
        "$PEER_DDP_LAUNCH"

    # gantry_round CASE ROUND STEPS DP overrides...: gantry's run of the case; keeps its
    # summary, metrics and resolved spec, and the OMP_WAIT_POLICY its rank 0 logged.
    gantry_round() {
        local case="$1" round="$2" steps="$3" dp="$4"
        shift 4
        local dir="$PEER_OUT/$case-gantry" log="$PEER_OUT/$case.r$round.gantry.log"
        rm -rf "$dir"
        if ! launch_gantry "${case%%-*}" examples/tiny-gpt-cpu/job.toml "$dir" "$log" "$steps" "$dp" 1 1 "$@"; then
            printf '%-6s %-6s round %s: gantry FAILED, see %s\n' "${case%%-*}" "${case#*-}" "$round" "$log"
            return 1
        fi
        cp "$dir/summary.json" "$PEER_OUT/$case.r$round.gantry.json"
        cp "$dir/metrics.jsonl" "$PEER_OUT/$case.r$round.gantry.metrics.jsonl"
        cp "$dir/spec.toml" "$PEER_OUT/$case.spec.toml"
        # `... OpenMP threads ... omp_wait_policy="libgomp default" ...` (quotes, colours optional)
        sed 's/\x1b\[[0-9;]*m//g' "$dir/logs/rank-0.log" | grep 'OpenMP threads' | head -n 1 |
            sed -n 's/.*omp_wait_policy=\("[^"]*"\|[^ ]*\).*/\1/p' | tr -d '"' >"$PEER_OUT/$case.omp"
        # An older binary does not log it: the peer then keeps this script's environment.
        [[ -s "$PEER_OUT/$case.omp" ]] || echo "not logged" >"$PEER_OUT/$case.omp"
    }

    # peer_round CASE ROUND DP: the eager peer on gantry's spec of the case, with its policy.
    peer_round() {
        local case="$1" round="$2" dp="$3"
        local out="$PEER_OUT/$case.r$round.peer.json" log="$PEER_OUT/$case.r$round.peer.log"
        local policy run=(env)
        policy="$(cat "$PEER_OUT/$case.omp")"
        case $policy in
            "libgomp default") run+=(-u OMP_WAIT_POLICY) ;;
            "not logged") ;;
            *) run+=("OMP_WAIT_POLICY=$policy") ;;
        esac
        run+=(PYTHONWARNINGS=ignore)
        if [[ $dp -eq 1 ]]; then
            run+=("$TORCH_PY" bench/peers/torch_gpt_train.py)
        elif [[ $PEER_DDP_LAUNCH == torchrun ]]; then
            run+=("$TORCH_PY" -m torch.distributed.run --standalone --nproc-per-node "$dp"
                bench/peers/torch_gpt_train.py --ddp)
        else
            run+=("$TORCH_PY" bench/peers/torch_gpt_train.py --spawn "$dp")
        fi
        if ! "${run[@]}" --spec "$PEER_OUT/$case.spec.toml" >"$out" 2>"$log"; then
            printf '%-6s %-6s round %s: peer FAILED, see %s\n' "${case%%-*}" "${case#*-}" "$round" "$log"
            return 1
        fi
    }

    # peer_case MODEL STEPS DP overrides...: ROUNDS rounds, gantry first in odd rounds.
    peer_case() {
        local model="$1" steps="$2" dp="$3" round
        shift 3
        local case="$model-dp$dp"
        rm -f "$PEER_OUT/$case".r*
        for ((round = 1; round <= ROUNDS; round++)); do
            if ((round % 2 == 1)); then
                gantry_round "$case" "$round" "$steps" "$dp" "$@" || return 0
                peer_round "$case" "$round" "$dp" || return 0
            else
                peer_round "$case" "$round" "$dp" || return 0
                gantry_round "$case" "$round" "$steps" "$dp" "$@" || return 0
            fi
        done
    }

    CASES=()
    if [[ -z "$ONLY" || "$ONLY" == tiny ]]; then
        for dp in 1 2; do
            peer_case tiny "$TINY_STEPS" "$dp" "${TINY_SET[@]}"
            CASES+=("tiny-dp$dp")
        done
    fi
    if [[ -z "$ONLY" || "$ONLY" == 20m ]]; then
        for dp in 1 2; do
            peer_case 20m "$BIG_STEPS" "$dp" "${BIG_SET[@]}"
            CASES+=("20m-dp$dp")
        done
    fi
    python3 - "$PEER_OUT" "$ROUNDS" "${CASES[@]}" <<'PY'
import json, os, statistics, sys
out, rounds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"{'model':<6} {'case':<7} {'n':>2} {'params':>10} {'gantry tok/s':>12} {'eager tok/s':>12} "
      f"{'ratio':>6} {'paired':>6} {'gantry ms':>9} {'eager ms':>9} {'OMP_WAIT_POLICY':<16} "
      f"{'gantry loss':<13} {'eager loss':<13}")
for case in cases:
    model, dp = case.split("-")
    label = "1 rank" if dp == "dp1" else f"dp {dp[2:]}"
    g, p, gloss = [], [], None
    for r in range(1, rounds + 1):
        gf, pf = f"{out}/{case}.r{r}.gantry.json", f"{out}/{case}.r{r}.peer.json"
        if not (os.path.exists(gf) and os.path.exists(pf) and os.path.getsize(pf)):
            continue
        g.append(json.load(open(gf)))
        p.append(json.load(open(pf)))
        with open(f"{out}/{case}.r{r}.gantry.metrics.jsonl") as f:
            steps = [json.loads(line) for line in f if '"loss"' in line]
        gloss = (steps[0]["loss"], g[-1]["final_loss"])
    if not g:
        print(f"{model:<6} {label:<7}  no complete round")
        continue
    gt = [x["mean_tokens_per_s"] for x in g]
    pt = [x["tokens_per_s"] for x in p]
    gm, pm = statistics.median(gt), statistics.median(pt)
    paired = statistics.median(a / b for a, b in zip(gt, pt))
    policy = open(f"{out}/{case}.omp").read().strip()
    print(f"{model:<6} {label:<7} {len(g):>2} {g[-1]['params']:>10} {gm:>12,.0f} {pm:>12,.0f} "
          f"{gm / pm:>6.2f} {paired:>6.2f} "
          f"{statistics.median(x['mean_step_ms'] for x in g):>9.1f} "
          f"{statistics.median(x['step_ms'] for x in p):>9.1f} {policy:<16} "
          f"{gloss[0]:.3f}→{gloss[1]:.3f}   {p[-1]['first_loss']:.3f}→{p[-1]['final_loss']:.3f}")
    print(f"{'':<6} {'':<7}    per round: gantry {' '.join(f'{x:,.0f}' for x in gt)}; "
          f"eager {' '.join(f'{x:,.0f}' for x in pt)}")
    if p[-1]["params"] != g[-1]["params"]:
        print(f"{'':<6} {'':<7}    WARNING: parameter counts differ (eager {p[-1]['params']})")
print("# ratio = gantry tokens/s over eager's at the medians; paired = median of the per-round ratios;")
print("# ms = mean step time over the steps after the first (median over rounds); loss = first→last step, last round")
PY
    printf '# done %s, load average %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

# ------------------------------------------------------------------ layout table
printf '# %s, %s cores, %s\n' "$(uname -n)" "$CORES" "$(date -u +%Y-%m-%dT%H:%MZ)"
printf '%-6s %-12s %6s %10s %10s %10s %10s %8s\n' model "dp×tp×pp" ranks params "tokens/s" "step ms" "update ms" "comm %"

run_one() { # model spec steps dp tp pp extra-overrides...
    local model="$1" spec="$2" steps="$3" dp="$4" tp="$5" pp="$6"
    shift 6
    local n=$((dp * tp * pp))
    local dir="$OUT/$model-$dp$tp$pp"
    local log="$OUT/$model-$dp$tp$pp.launch.log"
    if ! launch_gantry "$model" "$spec" "$dir" "$log" "$steps" "$dp" "$tp" "$pp" "$@"; then
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
        run_one tiny examples/tiny-gpt-cpu/job.toml "$TINY_STEPS" $l "${TINY_SET[@]}"
    done
fi
if [[ -z "$ONLY" || "$ONLY" == 20m ]]; then
    for l in "${BIG_LAYOUTS[@]}"; do
        # shellcheck disable=SC2086
        run_one 20m examples/tiny-gpt-cpu/job.toml "$BIG_STEPS" $l "${BIG_SET[@]}"
    done
fi
