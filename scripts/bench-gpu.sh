#!/usr/bin/env bash
# scripts/bench-gpu.sh: the GPU check of issue 18 as ONE device call with a hard time budget:
# everything the GPU host can prove, each stage under `timeout`, one failure never stopping the
# rest. `--cpu-smoke` runs every stage with tiny configs on the CPU (CI runs it through
# launch/tests/gpu_script.rs), so the script cannot rot while no GPU is lent.
#
#   bash scripts/bench-gpu.sh               # on the GPU host (shared/GPU.md)
#   bash scripts/bench-gpu.sh --cpu-smoke   # here: tiny configs, CPU, NCCL skipped
#
# Preparing the GPU run (the host has no Rust toolchain and no network):
#   cargo build --release -p gantry && mkdir -p .gpu && strip -o .gpu/gantry target/release/gantry
#   (stripped ~28 MB; the device tool carries 64 MiB at most; /.gpu/ is git-ignored locally)
# then run it there with .gpu carried, $OUT set by the device tool, and a timeout of 600 s.
#
# Stages, in order (a line is appended to $OUT/progress.txt after each):
#   preflight    nvidia-smi, every library of the binary and of libtorch_cuda.so resolves
#                (ldd), the libnccl.so symlink of shared/GPU.md, the peer's Python
#   data         synthetic tokens (vocab 50304; smoke: 512)
#   nccl         `gantry bench nccl --json` (f32 and bf16, world size 1 on device memory);
#                smoke: skipped, with the typed "not available" error it reports
#   mfu-124M, mfu-350M, mfu-1.3B
#                `gantry launch --local 1` (train.device = cuda, constant LR like the peer)
#                next to bench/peers/torch_gpt_mfu.py: tokens/s and MFU, both the upper
#                median step after the warm-up; the 1.3B run saves one checkpoint at its end
#   ckpt-1.3B    that save's stall (`ckpt_stall_ms`) and save time (`ckpt_committed.save_s`)
#                from the run's metrics.jsonl
#   resume-350M  save at step 4 -> resume to step 6 -> `gantry checkpoint verify`
#   serve-350M   `gantry registry serve --device cuda` with the checkpoint registered, greedy
#                `generate`, `gantry eval --device cuda` next to `--device cpu`
#                (smoke: --device auto must pick cpu, cpu must agree, cuda must be refused)
# No new stage starts after GANTRY_GPU_BUDGET_S (default 420 s); every command's timeout is
# cut so it ends by GANTRY_GPU_HARD_S (default 560 s). Stages skipped for the budget are said
# so and do not fail the run.
#
# Results ($OUT, at most 8 files): progress.txt, summary.json (every stage, status, seconds
# and figures), preflight.txt, rank-logs.txt (device and compute-dtype lines of each gantry
# run, its warnings counted), failures.log (stderr tails of what failed). Data, run
# directories and checkpoints live under GANTRY_GPU_WORK (default /tmp/gantry-gpu-work; smoke:
# a fresh temporary directory, removed at the end), never under $OUT; checkpoints are removed
# as soon as their stage is done.
#
# Environment:
#   OUT                  result directory (default /tmp/gantry-gpu-out)
#   GANTRY_BIN           the gantry binary (default .gpu/gantry, else target/release/gantry;
#                        smoke: target/debug/gantry, else target/release/gantry)
#   TORCH_PYTHON         Python with torch for the peer (default /opt/torch/.venv/bin/python;
#                        smoke: .tools/torch-peer/bin/python; the peer is skipped without one)
#   GANTRY_GPU_WORK, GANTRY_GPU_BUDGET_S, GANTRY_GPU_HARD_S, GANTRY_BENCH_STEPS (30 timed
#   steps after 5 warm-up steps; smoke: 3 after 1)
#
# Exit status: 0 when no stage failed (skipped stages do not count), 1 otherwise, 2 on a
# usage error.
set -uo pipefail

MODE=gpu
for arg in "$@"; do
    case $arg in
        --cpu-smoke) MODE=smoke ;;
        -h | --help)
            sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "bench-gpu.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
SMOKE=0
[[ $MODE == smoke ]] && SMOKE=1

BUDGET_S=${GANTRY_GPU_BUDGET_S:-420}
HARD_S=${GANTRY_GPU_HARD_S:-560}
OUT=${OUT:-/tmp/gantry-gpu-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd -P)

# Scratch space: never under $OUT (only result files go there).
OWN_WORK=0
if [[ -n ${GANTRY_GPU_WORK:-} ]]; then
    WORK=$GANTRY_GPU_WORK
elif ((SMOKE)); then
    WORK=$(mktemp -d /tmp/gantry-gpu-smoke.XXXXXX) || exit 2
    OWN_WORK=1
else
    WORK=/tmp/gantry-gpu-work
fi
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd -P)
case "$WORK/" in
    "$OUT"/*)
        echo "bench-gpu.sh: GANTRY_GPU_WORK ($WORK) must not be under OUT ($OUT)" >&2
        exit 2
        ;;
esac
rm -f "$WORK/stages.tsv"
mkdir -p "$WORK/figures" "$WORK/cmd"
rm -f "$WORK"/figures/*.json
PROGRESS=$OUT/progress.txt
FAILURES=$OUT/failures.log
RANK_LOGS=$OUT/rank-logs.txt
PREFLIGHT=$OUT/preflight.txt
: >"$PROGRESS"
: >"$FAILURES"
: >"$RANK_LOGS"
: >"$PREFLIGHT"

# ---------------------------------------------------------------------------------------------
# Binaries, libraries, Python.
if [[ -n ${GANTRY_BIN:-} ]]; then
    GANTRY=$GANTRY_BIN
elif ((SMOKE)); then
    GANTRY=target/debug/gantry
    [[ -x $GANTRY ]] || GANTRY=target/release/gantry
else
    GANTRY=.gpu/gantry
    [[ -x $GANTRY ]] || GANTRY=target/release/gantry
fi
[[ $GANTRY = /* ]] || GANTRY="$REPO/$GANTRY"

TORCH_SITE=/opt/torch/.venv/lib/python3.12/site-packages
if ((SMOKE)); then
    PEER_PY=${TORCH_PYTHON:-$REPO/.tools/torch-peer/bin/python}
else
    PEER_PY=${TORCH_PYTHON:-/opt/torch/.venv/bin/python}
    # shared/GPU.md: cudarc opens libnccl.so; torch's NCCL 2.28.9 works where the system's
    # 2.28.3 does not. Set before any stage, so a failed preflight still leaves the rest a
    # chance.
    mkdir -p /tmp/nccl && ln -sf "$TORCH_SITE/nvidia/nccl/lib/libnccl.so.2" /tmp/nccl/libnccl.so
    export LD_LIBRARY_PATH="/tmp/nccl:$TORCH_SITE/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# A Python for the bookkeeping (JSON figures); any python3 will do.
if command -v python3 >/dev/null 2>&1; then
    JPY=python3
else
    JPY=$PEER_PY
fi
PEER_OK=0
PEER_WHY=""
if [[ ! -x $PEER_PY ]]; then
    PEER_WHY="no Python at $PEER_PY (set TORCH_PYTHON to one with torch)"
elif ! "$PEER_PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' >/dev/null 2>&1; then
    PEER_WHY="$PEER_PY has no torch (set TORCH_PYTHON to one with torch)"
else
    PEER_OK=1
fi

# Sizes: name d_model layers heads batch. vocab, seq, steps per mode.
if ((SMOKE)); then
    VOCAB=512 SEQ=64 TOKENS=300000 STEPS=${GANTRY_BENCH_STEPS:-3} WARMUP=1
    # The peer's figures mean nothing on the CPU (bf16 CPU autocast): one timed step proves
    # the command line.
    PEER_STEPS=1 PEER_WARMUP=1
    DEVICE=cpu PEER_DEVICE=cpu
    SIZES=("124M 64 2 4 4" "350M 64 2 4 4" "1.3B 64 2 4 4")
    NCCL_ARGS=(--count 4096 --iters 2 --warmup 1)
    T_LAUNCH=120 T_PEER=120 T_BIG=120 T_NCCL=60 T_SERVE=120
else
    VOCAB=50304 SEQ=1024 TOKENS=4000000 STEPS=${GANTRY_BENCH_STEPS:-30} WARMUP=5
    DEVICE=cuda PEER_DEVICE=cuda
    SIZES=("124M 768 12 12 16" "350M 1024 24 16 8" "1.3B 2048 24 16 8")
    NCCL_ARGS=()
    PEER_STEPS=$STEPS PEER_WARMUP=$WARMUP
    T_LAUNCH=150 T_PEER=120 T_BIG=300 T_NCCL=90 T_SERVE=150
fi
DATA=$WORK/data

# ---------------------------------------------------------------------------------------------
# Bookkeeping.
cat >"$WORK/figures.py" <<'PYEOF'
"""Figures for bench-gpu.sh: rows from metrics.jsonl and the peer's JSON, the summary."""
import json, os, sys


def upper_median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def steps_of(run):
    out = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "step" in r:
                out.append(r)
    return out


def gantry_row(run, warmup):
    """Median step after the warm-up, the peer's rule (upper median)."""
    rows = steps_of(run)
    timed = [r for r in rows if r["step"] > warmup] or rows
    ms = upper_median([r["step_ms"] for r in timed])
    tokens_per_step = rows[0]["tokens"] // rows[0]["step"]
    mfus = [r["mfu"] * r["step_ms"] / ms for r in timed if r.get("mfu")]
    summary = json.load(open(os.path.join(run, "summary.json")))
    return {
        "impl": "gantry", "step_ms": ms, "tokens_per_s": tokens_per_step / ms * 1e3,
        "mfu": mfus[0] if mfus else None,
        "update_ms": upper_median([r.get("update_ms", 0.0) for r in timed]),
        "params": summary.get("params"), "steps_timed": len(timed),
        "final_loss": summary.get("final_loss"),
    }


def ckpt(run):
    rows = steps_of(run)
    stall = [r["ckpt_stall_ms"] for r in rows if r.get("ckpt_stall_ms") is not None]
    committed = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("ckpt_committed"):
                committed.append(r["ckpt_committed"])
    if not stall or not committed:
        raise SystemExit(f"no checkpoint in {run}/metrics.jsonl (stall {stall}, committed {committed})")
    c = committed[-1]
    return {"ckpt_stall_ms": stall[-1], "save_s": c["save_s"], "write_s": c["write_s"],
            "bytes": c["bytes"], "step": c["step"],
            "gb_per_s": c["bytes"] / c["save_s"] / 1e9 if c["save_s"] > 0 else None}


def fmt_row(r):
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return f"{r['impl']} {r['tokens_per_s']:.0f} tok/s, MFU {mfu}, step {r['step_ms']:.1f} ms"


def summary(work, out, mode, binary, elapsed):
    stages = []
    with open(os.path.join(work, "stages.tsv")) as f:
        for line in f:
            name, status, seconds, detail = line.rstrip("\n").split("\t", 3)
            fig = os.path.join(work, "figures", name + ".json")
            figures = json.load(open(fig)) if os.path.exists(fig) else None
            stages.append({"stage": name, "status": status, "seconds": int(seconds),
                           "detail": detail, "figures": figures})
    doc = {"mode": mode, "binary": binary, "elapsed_s": elapsed, "stages": stages,
           "failed": [s["stage"] for s in stages if s["status"] == "FAILED"]}
    tmp = os.path.join(out, ".summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(out, "summary.json"))


cmd = sys.argv[1]
if cmd == "gantry-row":
    print(json.dumps(gantry_row(sys.argv[2], int(sys.argv[3]))))
elif cmd == "ckpt":
    print(json.dumps(ckpt(sys.argv[2])))
elif cmd == "fmt-row":
    print(fmt_row(json.loads(sys.argv[2])))
elif cmd == "fmt-nccl":
    rows = json.load(open(sys.argv[2]))
    print("; ".join(f"{r['dtype']} {r['avg_us']:.0f} us ({r['algbw_gbps']:.1f} GB/s, ok={r['ok']})" for r in rows))
elif cmd == "fmt-ckpt":
    c = json.load(open(sys.argv[2]))
    print(f"stall {c['ckpt_stall_ms']:.0f} ms, save {c['save_s']:.1f} s for {c['bytes'] / 1e9:.2f} GB "
          f"({c['write_s']:.1f} s writing, this rank)")
elif cmd == "merge":
    # merge OUT.json KEY=FILE...: one object from JSON files (a missing/bad file: null)
    doc = {}
    for kv in sys.argv[3:]:
        k, path = kv.split("=", 1)
        try:
            text = open(path).read().strip()
            doc[k] = json.loads(text.splitlines()[-1]) if text else None
        except (OSError, ValueError, IndexError):
            doc[k] = None
    json.dump(doc, open(sys.argv[2], "w"))
elif cmd == "generate":
    # generate ADDR MODEL N: N greedy tokens after a fixed prompt; exit 1 unless N came back
    import urllib.request
    addr, model, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    body = {"tokens": [11, 22, 33, 44], "max_tokens": n, "temperature": 0, "stop_at_eod": False}
    req = urllib.request.Request(f"http://{addr}/v1/models/{model}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    r = json.loads(urllib.request.urlopen(req, timeout=120).read().decode())
    print(json.dumps({k: r.get(k) for k in ("tokens", "model", "version")}))
    if len(r.get("tokens") or []) != n:
        raise SystemExit(f"{len(r.get('tokens') or [])} tokens, wanted {n}: {r}")
elif cmd == "summary":
    summary(*sys.argv[2:6], int(sys.argv[6]))
else:
    raise SystemExit(f"unknown command {cmd}")
PYEOF
fig() { "$JPY" "$WORK/figures.py" "$@"; }

write_summary() {
    fig summary "$WORK" "$OUT" "$MODE" "$GANTRY" "$SECONDS" 2>>"$FAILURES" || true
}

# record NAME STATUS SECONDS DETAIL: one progress line, one row for summary.json.
record() {
    local name=$1 status=$2 took=$3 detail=${4//$'\n'/ }
    detail=${detail//$'\t'/ }
    printf '[%4ds] %-12s %-7s %s\n' "$SECONDS" "$name" "$status" "$detail" >>"$PROGRESS"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$detail" >>"$WORK/stages.tsv"
    write_summary
}

# limit WANT: a timeout that ends by HARD_S (at least 5 s).
limit() {
    local left=$((HARD_S - SECONDS))
    ((left < 5)) && left=5
    ((left < $1)) && echo "$left" || echo "$1"
}

# run TAG WANT_S CMD...: CMD under timeout, stdout/stderr in $WORK/cmd/TAG.{out,err}; the
# exit status (124/137: timed out). A failure's stderr tail goes to failures.log, unless
# EXPECTED_FAILURE=1 (the smoke's checks that something is refused).
run() {
    local tag=$1 t
    t=$(limit "$2")
    shift 2
    timeout -k 10 "$t" "$@" >"$WORK/cmd/$tag.out" 2>"$WORK/cmd/$tag.err"
    local rc=$?
    if ((rc != 0 && !${EXPECTED_FAILURE:-0})); then
        {
            printf '== %s (exit %d%s): %s\n' "$tag" "$rc" "$( ((rc == 124 || rc == 137)) && echo ", timed out after ${t}s")" "$*"
            tail -n 25 "$WORK/cmd/$tag.err"
        } >>"$FAILURES"
    fi
    return $rc
}

# why TAG RC: one line saying how a command failed.
why() {
    if (($2 == 124 || $2 == 137)); then
        echo "timed out"
    else
        local last
        last=$(grep -v '^\s*$' "$WORK/cmd/$1.err" 2>/dev/null | tail -n 1)
        echo "exit $2${last:+: ${last:0:300}}"
    fi
}

# stage NAME FUNCTION: run one stage unless the budget is spent. The function sets
# STATUS (ok | FAILED | skipped) and DETAIL, and may write $WORK/figures/NAME.json.
stage() {
    local name=$1 fn=$2
    if ((SECONDS >= BUDGET_S)); then
        record "$name" skipped 0 "budget: ${SECONDS}s elapsed, no new stage after ${BUDGET_S}s"
        return
    fi
    STATUS=ok
    DETAIL=""
    local t0=$SECONDS
    "$fn" "$name"
    record "$name" "$STATUS" $((SECONDS - t0)) "$DETAIL"
}

fail() {
    STATUS=FAILED
    DETAIL="${DETAIL:+$DETAIL; }$*"
}
note() { DETAIL="${DETAIL:+$DETAIL; }$*"; }

SERVER_PID=""
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
        SERVER_PID=""
    fi
    rm -rf "$WORK/ckpt-1.3B" "$WORK/ckpt-350M"
}
on_exit() {
    cleanup
    ((OWN_WORK)) && rm -rf "$WORK"
}
trap on_exit EXIT
trap 'echo "bench-gpu.sh: interrupted" >>"$PROGRESS"; exit 130' INT TERM

# rank_log NAME RUN: the device / dtype lines of a run's rank-0 log and its warnings, counted.
rank_log() {
    local log=$2/logs/rank-0.log
    [[ -f $log ]] || return 0
    {
        echo "== $1 ($log)"
        grep -m 4 -E 'compute|device' "$log"
        printf 'warnings: %s (deprecation: %s), errors: %s\n' "$(grep -c ' WARN ' "$log")" \
            "$(grep -ci 'deprecat' "$log")" "$(grep -c ' ERROR ' "$log")"
        grep -m 3 -E ' WARN | ERROR ' "$log"
    } >>"$RANK_LOGS"
}

# ---------------------------------------------------------------------------------------------
# Stages.
st_preflight() {
    {
        echo "mode: $MODE"
        echo "binary: $GANTRY"
        echo "work: $WORK"
        echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
    } >>"$PREFLIGHT"
    if command -v nvidia-smi >/dev/null 2>&1; then
        if timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
            >>"$PREFLIGHT" 2>&1; then
            note "GPU: $(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
        else
            ((SMOKE)) && note "nvidia-smi failed" || fail "nvidia-smi failed"
        fi
    elif ((SMOKE)); then
        note "no nvidia-smi (cpu smoke)"
        echo "nvidia-smi: not installed (cpu smoke)" >>"$PREFLIGHT"
    else
        fail "no nvidia-smi"
    fi
    if [[ ! -x $GANTRY ]]; then
        fail "$GANTRY missing (build and copy it: see the header)"
        return
    fi
    local missing
    missing=$(ldd "$GANTRY" 2>&1 | grep 'not found')
    if [[ -n $missing ]]; then
        fail "unresolved libraries of gantry: $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')"
        echo "ldd $GANTRY: $missing" >>"$PREFLIGHT"
    else
        note "gantry's libraries resolve"
    fi
    if ((!SMOKE)); then
        local cuda_lib=$TORCH_SITE/torch/lib/libtorch_cuda.so
        if [[ ! -f $cuda_lib ]]; then
            fail "$cuda_lib missing"
        else
            missing=$(ldd "$cuda_lib" 2>&1 | grep 'not found')
            [[ -z $missing ]] || fail "libtorch_cuda.so: unresolved $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')"
        fi
        if [[ -e /tmp/nccl/libnccl.so ]]; then
            echo "libnccl.so -> $(readlink -f /tmp/nccl/libnccl.so)" >>"$PREFLIGHT"
        else
            fail "libnccl.so symlink broken: $TORCH_SITE/nvidia/nccl/lib/libnccl.so.2 missing"
        fi
    fi
    local rc=0
    run version 30 "$GANTRY" --version || rc=$?
    if ((rc == 0)); then
        note "$(cat "$WORK/cmd/version.out")"
    else
        fail "gantry --version: $(why version $rc)"
    fi
    if ((PEER_OK)); then
        note "peer Python $PEER_PY"
    else
        note "peer skipped: $PEER_WHY"
    fi
    echo "peer python: $PEER_PY (${PEER_WHY:-torch found})" >>"$PREFLIGHT"
}

st_data() {
    local rc=0
    rm -rf "$DATA"
    run data 120 "$GANTRY" data synth --output "$DATA" --tokens "$TOKENS" --vocab-size "$VOCAB" --seed 1 || rc=$?
    if ((rc == 0)); then
        note "$TOKENS tokens, vocab $VOCAB"
    else
        fail "gantry data synth: $(why data $rc)"
    fi
    cat >"$WORK/job.toml" <<SPEC
name = "gpu-bench"
[model]
arch = "gpt2"
vocab_size = $VOCAB
seq_len = $SEQ
tie_embeddings = true
[data]
path = "$DATA"
valid_fraction = 0.0
[optim]
# constant, as the peer's (3e-4, AdamW betas 0.9/0.95, weight decay 0.1, clip 1.0)
lr = 3e-4
min_lr = 3e-4
warmup_steps = 0
[train]
device = "$DEVICE"
eval_every = 0
sample_tokens = 0
SPEC
}

st_nccl() {
    local name=$1 rc=0
    EXPECTED_FAILURE=$SMOKE run nccl "$T_NCCL" "$GANTRY" bench nccl --json --dtype f32,bf16 "${NCCL_ARGS[@]}" || rc=$?
    if ((rc == 0)); then
        "$JPY" -c 'import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1]) if l.strip()]))' \
            "$WORK/cmd/nccl.out" >"$WORK/figures/$name.json"
        note "$(fig fmt-nccl "$WORK/figures/$name.json")"
    elif ((rc == 3)); then
        local msg
        msg=$(grep -m 1 'not available' "$WORK/cmd/nccl.err")
        msg=${msg#gantry: bench nccl: }
        if ((SMOKE)); then
            STATUS=skipped
            note "typed error: $msg"
        else
            fail "NCCL unavailable on the GPU host: $msg"
        fi
    else
        fail "gantry bench nccl: $(why nccl $rc)"
    fi
}

# mfu_row NAME D L H B [CKPT_DIR]: gantry and the peer at one size.
mfu_row() {
    local name=$1 d=$2 l=$3 h=$4 b=$5 ckpt=${6:-}
    local run_dir=$WORK/run-$name timeout_s=$T_LAUNCH
    [[ $name == 1.3B ]] && timeout_s=$T_BIG
    rm -rf "$run_dir"
    local extra=()
    if [[ -n $ckpt ]]; then
        rm -rf "$ckpt"
        extra=(--checkpoint-dir "$ckpt")
    fi
    local rc=0
    run "gantry-$name" "$timeout_s" "$GANTRY" launch "$WORK/job.toml" --local 1 --run-dir "$run_dir" --json \
        --set model.d_model="$d" --set model.n_layers="$l" --set model.n_heads="$h" \
        --set train.global_batch="$b" --set train.micro_batch="$b" \
        --set train.steps=$((STEPS + WARMUP)) "${extra[@]}" || rc=$?
    rank_log "mfu-$name" "$run_dir"
    if ((rc == 0)) && fig gantry-row "$run_dir" "$WARMUP" >"$WORK/cmd/row-gantry-$name.json" 2>>"$FAILURES"; then
        note "$(fig fmt-row "$(cat "$WORK/cmd/row-gantry-$name.json")")"
    else
        ((rc == 0)) && rc=1
        fail "gantry: $(why "gantry-$name" $rc)"
        : >"$WORK/cmd/row-gantry-$name.json"
    fi
    : >"$WORK/cmd/row-peer-$name.json"
    if ((!PEER_OK)); then
        note "peer skipped: $PEER_WHY"
    else
        local prc=0
        run "peer-$name" "$T_PEER" "$PEER_PY" bench/peers/torch_gpt_mfu.py --device "$PEER_DEVICE" \
            --d-model "$d" --layers "$l" --heads "$h" --batch "$b" --seq "$SEQ" --vocab "$VOCAB" \
            --steps "$PEER_STEPS" --warmup "$PEER_WARMUP" || prc=$?
        if ((prc == 0)); then
            tail -n 1 "$WORK/cmd/peer-$name.out" >"$WORK/cmd/row-peer-$name.json"
            note "$(fig fmt-row "$(cat "$WORK/cmd/row-peer-$name.json")")"
        else
            fail "peer: $(why "peer-$name" $prc)"
        fi
    fi
    fig merge "$WORK/figures/mfu-$name.json" gantry="$WORK/cmd/row-gantry-$name.json" \
        peer="$WORK/cmd/row-peer-$name.json"
}

size_of() {
    local s
    for s in "${SIZES[@]}"; do
        [[ $s == "$1 "* ]] && echo "$s"
    done
}
st_mfu_124m() { read -r n d l h b <<<"$(size_of 124M)" && mfu_row "$n" "$d" "$l" "$h" "$b"; }
st_mfu_350m() { read -r n d l h b <<<"$(size_of 350M)" && mfu_row "$n" "$d" "$l" "$h" "$b"; }
st_mfu_13b() { read -r n d l h b <<<"$(size_of 1.3B)" && mfu_row "$n" "$d" "$l" "$h" "$b" "$WORK/ckpt-1.3B"; }

st_ckpt_13b() {
    local name=$1
    if [[ ! -f $WORK/run-1.3B/metrics.jsonl ]]; then
        fail "no 1.3B run to read (mfu-1.3B failed or was skipped)"
    elif fig ckpt "$WORK/run-1.3B" >"$WORK/figures/$name.json" 2>"$WORK/cmd/ckpt.err"; then
        note "$(fig fmt-ckpt "$WORK/figures/$name.json")"
    else
        fail "$(tail -n 1 "$WORK/cmd/ckpt.err")"
    fi
    rm -rf "$WORK/ckpt-1.3B"
}

st_resume_350m() {
    local name=$1 d l h b rc=0
    read -r _ d l h b <<<"$(size_of 350M)"
    local ck=$WORK/ckpt-350M
    rm -rf "$ck" "$WORK/run-save" "$WORK/run-resume"
    local common=(--local 1 --json --set model.d_model="$d" --set model.n_layers="$l" --set model.n_heads="$h"
        --set train.global_batch="$b" --set train.micro_batch="$b" --checkpoint-dir "$ck")
    run save-350M "$T_LAUNCH" "$GANTRY" launch "$WORK/job.toml" --run-dir "$WORK/run-save" \
        "${common[@]}" --set train.steps=4 || rc=$?
    if ((rc != 0)); then
        fail "save (4 steps): $(why save-350M $rc)"
        return
    fi
    rank_log "save-350M" "$WORK/run-save"
    run resume-350M "$T_LAUNCH" "$GANTRY" launch "$WORK/job.toml" --run-dir "$WORK/run-resume" \
        "${common[@]}" --set train.steps=6 --resume latest || rc=$?
    if ((rc != 0)); then
        fail "resume (to step 6): $(why resume-350M $rc)"
        return
    fi
    local first
    first=$("$JPY" -c 'import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{\"step\"")]
print(rows[0]["step"] if rows else "none")' "$WORK/run-resume/metrics.jsonl" 2>/dev/null)
    if [[ $first == 5 ]]; then
        note "saved step 4, resumed at step 5"
    else
        fail "the resumed run's first step is $first, not 5"
    fi
    rc=0
    run verify-350M "$T_LAUNCH" "$GANTRY" checkpoint verify "$ck" --json || rc=$?
    if ((rc == 0)); then
        tail -n 1 "$WORK/cmd/verify-350M.out" >"$WORK/cmd/verify.json"
        note "checkpoint verify ok"
    else
        fail "checkpoint verify: $(why verify-350M $rc)"
        : >"$WORK/cmd/verify.json"
    fi
    fig ckpt "$WORK/run-save" >"$WORK/cmd/save.json" 2>/dev/null || : >"$WORK/cmd/save.json"
    fig merge "$WORK/figures/$name.json" save="$WORK/cmd/save.json" verify="$WORK/cmd/verify.json"
}

# eval_on DEVICE TAG: `gantry eval` of the registered model on DEVICE; the JSON line in
# $WORK/cmd/TAG.out.
eval_on() {
    run "$2" "$T_SERVE" env GANTRY_REGISTRY="http://$ADDR" "$GANTRY" eval --model gpt@1 --data "$DATA" \
        --max-samples 4 --batch 2 --no-record --json --device "$1"
}

st_serve_350m() {
    local name=$1 ck=$WORK/ckpt-350M
    if [[ ! -f $ck/latest ]] && ! ls "$ck"/*/manifest.json >/dev/null 2>&1; then
        STATUS=skipped
        note "no 350M checkpoint (resume-350M failed)"
        rm -rf "$ck"
        return
    fi
    local token=gpu-bench-write-token-0123456789
    echo "write $token" >"$WORK/tokens"
    rm -f "$WORK/registry.redb"
    local serve_device=cuda
    ((SMOKE)) && serve_device=auto
    timeout -k 10 "$(limit $((T_SERVE * 2)))" "$GANTRY" registry serve --listen 127.0.0.1:0 --json \
        --db "$WORK/registry.redb" --token-file "$WORK/tokens" --batch-slots 2 --device "$serve_device" \
        >"$WORK/cmd/serve.out" 2>"$WORK/cmd/serve.err" &
    SERVER_PID=$!
    ADDR=""
    local i
    for ((i = 0; i < 300; i++)); do
        ADDR=$("$JPY" -c 'import json,sys
try: print(json.loads(open(sys.argv[1]).readline())["address"])
except Exception: pass' "$WORK/cmd/serve.out" 2>/dev/null)
        [[ -n $ADDR ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.2
    done
    if [[ -z $ADDR ]]; then
        fail "registry serve --device $serve_device did not start: $(tail -n 1 "$WORK/cmd/serve.err")"
        tail -n 25 "$WORK/cmd/serve.err" >>"$FAILURES"
        cleanup
        return
    fi
    local served
    served=$(grep -m 1 'generation on' "$WORK/cmd/serve.err")
    note "serve: ${served#gantry registry serve: }"
    local rc=0
    run register "$T_SERVE" env GANTRY_REGISTRY="http://$ADDR" GANTRY_REGISTRY_TOKEN="$token" \
        "$GANTRY" models register gpt --checkpoint "$ck" --json || rc=$?
    if ((rc != 0)); then
        fail "models register: $(why register $rc)"
        cleanup
        return
    fi
    rc=0
    run generate "$T_SERVE" "$JPY" "$WORK/figures.py" generate "$ADDR" gpt@1 8 || rc=$?
    if ((rc == 0)); then
        tail -n 1 "$WORK/cmd/generate.out" >"$WORK/cmd/generate.json"
        note "generate: 8 greedy tokens"
    else
        fail "generate: $(why generate $rc)"
        : >"$WORK/cmd/generate.json"
    fi
    # The eval devices: the GPU's answer next to the CPU's; in the smoke, auto must pick the
    # CPU and agree with --device cpu, and --device cuda must be refused by name.
    local first=cuda
    ((SMOKE)) && first=auto
    rc=0
    eval_on "$first" eval-first || rc=$?
    if ((rc == 0)); then
        tail -n 1 "$WORK/cmd/eval-first.out" >"$WORK/cmd/eval-first.json"
    else
        fail "eval --device $first: $(why eval-first $rc)"
        : >"$WORK/cmd/eval-first.json"
    fi
    rc=0
    eval_on cpu eval-cpu || rc=$?
    if ((rc == 0)); then
        tail -n 1 "$WORK/cmd/eval-cpu.out" >"$WORK/cmd/eval-cpu.json"
    else
        fail "eval --device cpu: $(why eval-cpu $rc)"
        : >"$WORK/cmd/eval-cpu.json"
    fi
    local cmp
    if cmp=$("$JPY" - "$WORK/cmd/eval-first.json" "$WORK/cmd/eval-cpu.json" "$SMOKE" <<'PYEOF' 2>&1
import json, sys
a, c = (json.loads(open(p).read()) for p in sys.argv[1:3])
smoke = sys.argv[3] == "1"
rel = abs(a["loss"] - c["loss"]) / c["loss"]
print(f"eval loss {a['loss']:.4f} on {a['device']} ({a['compute']}), {c['loss']:.4f} on {c['device']} (rel diff {rel:.2e})")
if smoke:
    ok = a["device"] == "cpu" and rel < 1e-6
else:
    ok = a["device"].startswith("cuda") and rel < 2e-2
sys.exit(0 if ok else 1)
PYEOF
    ); then
        note "$cmp"
    else
        fail "eval devices disagree: $cmp"
    fi
    if ((SMOKE)); then
        rc=0
        EXPECTED_FAILURE=1 eval_on cuda eval-cuda || rc=$?
        if ((rc != 0)) && grep -q -- '--device cuda: no CUDA device is visible' "$WORK/cmd/eval-cuda.err"; then
            note "eval --device cuda refused: no CUDA device is visible"
        else
            fail "eval --device cuda without a GPU: expected the flag's error, got exit $rc"
        fi
    fi
    fig merge "$WORK/figures/$name.json" eval_first="$WORK/cmd/eval-first.json" \
        eval_cpu="$WORK/cmd/eval-cpu.json" generate="$WORK/cmd/generate.json"
    cleanup
}

# ---------------------------------------------------------------------------------------------
printf '[%4ds] %-12s %-7s %s\n' 0 start "$MODE" "binary $GANTRY; budget ${BUDGET_S}s, hard ${HARD_S}s; work $WORK" >>"$PROGRESS"
stage preflight st_preflight
stage data st_data
stage nccl st_nccl
stage mfu-124M st_mfu_124m
stage mfu-350M st_mfu_350m
stage mfu-1.3B st_mfu_13b
stage ckpt-1.3B st_ckpt_13b
stage resume-350M st_resume_350m
stage serve-350M st_serve_350m

failed=$(awk -F'\t' '$2 == "FAILED" {print $1}' "$WORK/stages.tsv" | tr '\n' ' ')
skipped=$(awk -F'\t' '$2 == "skipped" {print $1}' "$WORK/stages.tsv" | tr '\n' ' ')
printf '[%4ds] %-12s %-7s %s\n' "$SECONDS" done "$([[ -z $failed ]] && echo ok || echo FAILED)" \
    "failed: ${failed:-none}; skipped: ${skipped:-none}" >>"$PROGRESS"
write_summary
[[ -s $FAILURES ]] || rm -f "$FAILURES"
cat "$PROGRESS" >&2
[[ -z $failed ]]
