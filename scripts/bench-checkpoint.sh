#!/usr/bin/env bash
# scripts/bench-checkpoint.sh: checkpoint save/load throughput next to raw writes and
# reads of the same bytes in the same place, on local disk and on a real S3 server
# (s3s-fs on loopback), then the trainer's stall vs total save time in real runs.
#
#   bash scripts/bench-checkpoint.sh [--json]
#
# 1. local   gantry bench checkpoint --url $WORK/local --cold: RANKS in-process ranks
#            save GIB GiB with the real Saver; raw peer = std::fs write_all (without
#            and with sync_all, like dd conv=fdatasync) of the same bytes as RANKS files,
#            read back warm and cold (posix_fadvise DONTNEED).
# 2. s3      the same against s3s-fs (.tools/bin/s3s-fs, started here on a free port
#            with throwaway keys; AWS_ENDPOINT_URL etc. exported for gantry); raw peer =
#            one object of the same size through a plain multipart Store::put / get.
# 3. dcp     the peer PyTorch users have: torch.distributed.checkpoint on CPU with gloo
#            (bench/peers/dcp_checkpoint.py, the same tensors as DTensors sharded by rows),
#            alternating with `gantry bench checkpoint --repeat 1` round by round (REPEAT
#            rounds): save, load into the same layout (R -> R ranks), load resharded into
#            one process (R -> 1); medians and the median of the per-round ratios. Needs a
#            Python where `import torch` works: TORCH_PYTHON, or .tools/torch-peer, made on
#            first use (scripts/bench-lib.sh: torch_peer_python).
# 4. train   `gantry launch --local 2` with checkpoints to $WORK/train-*: the tiny model
#            (examples/tiny-gpt-cpu, dp 2, checkpoint.every=10, 40 steps) and the 20m
#            model of scripts/bench-train-cpu.sh (dp 2, checkpoint.every=2, 8 steps);
#            prints, per save, the step's ckpt_stall_ms (training paused) next to
#            ckpt_committed.save_s (hand-off to commit) from the run's metrics.jsonl.
#
# --json: the bench cases print one JSON object each (gantry bench checkpoint --json);
# the training summary stays a table.
#
# Environment (defaults in brackets):
#   GIB [1]  RANKS [2]  REPEAT [5]     size, ranks, repetitions (median reported)
#   CASES ["local s3 dcp train"]       which cases to run
#   WORK [${TMPDIR:-/tmp}/gantry-bench-checkpoint-<pid>]   scratch, removed at the end
#   KEEP=1                             keep WORK (checkpoints, s3s-fs root, runs)
#   GANTRY_SKIP_BUILD=1                do not (re)build target/release/gantry in setup
#   GANTRY_BIN, GANTRY_S3S_FS          override the binaries
#
# Exit status: 1 when a case failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_args "$@"

GIB=${GIB:-1}
RANKS=${RANKS:-2}
REPEAT=${REPEAT:-5}
CASES=${CASES:-local s3 dcp train}
WORK=${WORK:-${TMPDIR:-/tmp}/gantry-bench-checkpoint-$$}

has_case() { [[ " $CASES " == *" $1 "* ]]; }

command -v python3 >/dev/null 2>&1 || die "python3 is needed (free port, metrics summary)"

# ------------------------------------------------------------------ setup
bench_setup
S3S_FS=${GANTRY_S3S_FS:-$REPO/.tools/bin/s3s-fs}

mkdir -p "$WORK"
S3_PID=""
cleanup() {
    if [[ -n $S3_PID ]]; then
        kill "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

FAILURES=()
BENCH_ARGS=(--gib "$GIB" --ranks "$RANKS" --repeat "$REPEAT")
[[ $JSON == 1 ]] && BENCH_ARGS+=(--json)

{
    echo "# host: $(nproc) cores, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# gantry: $("$GANTRY_BIN" --version 2>/dev/null || echo '?') ($GANTRY_BIN)"
    echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# scratch: $WORK ($(df -h --output=source,fstype "$WORK" 2>/dev/null | tail -n1 | tr -s ' '))"
} >&2

# ------------------------------------------------------------------ local disk
if has_case local; then
    log "local: gantry bench checkpoint --url $WORK/local ${BENCH_ARGS[*]} --cold"
    "$GANTRY_BIN" bench checkpoint --url "$WORK/local" "${BENCH_ARGS[@]}" --cold ||
        FAILURES+=(local)
fi

# ------------------------------------------------------------------ S3 (s3s-fs)
if has_case s3; then
    [[ -x $S3S_FS ]] || die "$S3S_FS not found (bash scripts/setup.sh installs it)"
    S3_ROOT="$WORK/s3s-root"
    BUCKET=gantry-bench
    mkdir -p "$S3_ROOT/$BUCKET"
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export AWS_ACCESS_KEY_ID="bench-$$" AWS_SECRET_ACCESS_KEY="secret-$$-$RANDOM" AWS_REGION=us-east-1
    export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
    "$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_ROOT" >"$WORK/s3s-fs.log" 2>&1 &
    S3_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        kill -0 "$S3_PID" 2>/dev/null || die "s3s-fs exited: $(tail -c 1000 "$WORK/s3s-fs.log")"
        sleep 0.1
    done
    log "s3: s3s-fs $("$S3S_FS" --version 2>/dev/null | tr -d '\n') on $AWS_ENDPOINT_URL (root $S3_ROOT)"
    log "s3: gantry bench checkpoint --url s3://$BUCKET/ckpt ${BENCH_ARGS[*]}"
    "$GANTRY_BIN" bench checkpoint --url "s3://$BUCKET/ckpt" "${BENCH_ARGS[@]}" || FAILURES+=(s3)
    kill "$S3_PID" 2>/dev/null || true
    wait "$S3_PID" 2>/dev/null || true
    S3_PID=""
    unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION AWS_ENDPOINT_URL
fi

# ------------------------------------------------------------------ DCP, alternating
if has_case dcp; then
    torch_peer_python
    log "dcp: $REPEAT rounds of gantry bench checkpoint --repeat 1 and dcp_checkpoint.py ($TORCH_PY)"
    for round in $(seq "$REPEAT"); do
        "$GANTRY_BIN" bench checkpoint --url "$WORK/dcp-gantry" --gib "$GIB" --ranks "$RANKS" \
            --repeat 1 --json >"$WORK/dcp-round-$round.gantry.json" || { FAILURES+=(dcp); break; }
        PYTHONWARNINGS=ignore "$TORCH_PY" bench/peers/dcp_checkpoint.py --dir "$WORK/dcp-peer" \
            --gib "$GIB" --ranks "$RANKS" --repeat 1 >"$WORK/dcp-round-$round.peer.json" ||
            { FAILURES+=(dcp); break; }
    done
    if [[ " ${FAILURES[*]} " != *" dcp "* ]]; then
        python3 - "$WORK" "$REPEAT" "$JSON" <<'PY' || FAILURES+=(dcp)
import json, statistics, sys

work, rounds, as_json = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
pairs = [  # (label, gantry row, DCP sample)
    ("save", "checkpoint save (save() -> all committed)", "save"),
    ("load, same layout (R->R)", "checkpoint load, same layout (R->R)", "load_same"),
    ("load, resharded (R->1)", "checkpoint load (open latest + load, R->1)", "load_reshard"),
]
g_s, d_s, nbytes, peer = {}, {}, None, None
for r in range(1, rounds + 1):
    g = json.load(open(f"{work}/dcp-round-{r}.gantry.json"))
    d = json.load(open(f"{work}/dcp-round-{r}.peer.json"))
    if g["bytes"] != d["bytes"]:
        sys.exit(f"round {r}: gantry saved {g['bytes']} bytes, DCP {d['bytes']}")
    nbytes, peer = g["bytes"], d["peer"]
    rows = {row["op"]: row["seconds"] for row in g["rows"]}
    for label, op, key in pairs:
        g_s.setdefault(label, []).append(rows[op])
        d_s.setdefault(label, []).append(d["samples_s"][key][0])
out = []
for label, _, _ in pairs:
    gm, dm = statistics.median(g_s[label]), statistics.median(d_s[label])
    paired = statistics.median(d / g for g, d in zip(g_s[label], d_s[label]))
    out.append({"op": label, "bytes": nbytes, "gantry_s": gm, "dcp_s": dm,
                "gantry_gbps": nbytes / gm / 1e9, "dcp_gbps": nbytes / dm / 1e9,
                "ratio": dm / gm, "paired_ratio": paired,
                "gantry_samples_s": g_s[label], "dcp_samples_s": d_s[label]})
if as_json:
    print(json.dumps({"case": "dcp", "peer": peer, "rounds": rounds, "rows": out}))
else:
    print(f"\ngantry vs {peer}: {nbytes / 2**30:.2f} GiB, {rounds} alternating rounds, warm page cache")
    print(f"{'operation':<28} {'gantry GB/s':>12} {'DCP GB/s':>10} {'ratio':>7} {'paired':>7}")
    for o in out:
        print(f"{o['op']:<28} {o['gantry_gbps']:>12.3f} {o['dcp_gbps']:>10.3f} {o['ratio']:>7.2f} {o['paired_ratio']:>7.2f}")
    print("# ratio = gantry GB/s over DCP's at the medians; paired = median of the per-round ratios")
PY
    fi
fi

# ------------------------------------------------------------------ training runs
# summarize RUN_DIR LABEL: per save, ckpt_stall_ms of its step and its ckpt_committed.
summarize() {
    python3 - "$1" "$2" <<'PY'
import json, statistics, sys

path, label = sys.argv[1] + "/metrics.jsonl", sys.argv[2]
stall, committed = {}, {}
with open(path) as f:
    for line in f:
        line = line.strip()
        if not line:
            continue
        m = json.loads(line)
        if m.get("ckpt_stall_ms") is not None:
            stall[m["step"]] = m["ckpt_stall_ms"]
        if m.get("ckpt_committed"):
            c = m["ckpt_committed"]
            committed[c["step"]] = c
print(f"\n{label}: per save, on the reporting rank: training paused (ckpt_stall_ms) vs hand-off to commit (save_s)")
print(f"{'step':>6} {'MB written':>12} {'stall ms':>10} {'write s':>9} {'save s':>8} {'stall/save':>11}")
rows = []
for step in sorted(set(stall) | set(committed)):
    s, c = stall.get(step), committed.get(step, {})
    save_s = c.get("save_s")
    ratio = f"{s / 1e3 / save_s:.1%}" if s is not None and save_s else "-"
    print(f"{step:>6} {c.get('bytes', 0) / 1e6:>12.1f} {(s if s is not None else float('nan')):>10.1f} "
          f"{c.get('write_s', float('nan')):>9.3f} {(save_s if save_s else float('nan')):>8.3f} {ratio:>11}")
    if s is not None and save_s:
        rows.append((s, save_s))
if rows:
    print(f"median: stall {statistics.median(r[0] for r in rows):.1f} ms, "
          f"save {statistics.median(r[1] for r in rows):.3f} s over {len(rows)} saves")
else:
    print("no save both stalled and committed in this run")
    sys.exit(1)
PY
}

# train_case LABEL DATA STEPS EVERY EXTRA...: one checkpointed run, then its summary.
train_case() {
    local label=$1 data=$2 steps=$3 every=$4
    shift 4
    local run="$WORK/run-$label" ckpt="$WORK/train-$label"
    log "train $label: gantry launch examples/tiny-gpt-cpu/job.toml --local 2 --set checkpoint.every=$every" \
        "--checkpoint-dir $ckpt ($steps steps)"
    if "$GANTRY_BIN" launch examples/tiny-gpt-cpu/job.toml --local 2 --run-dir "$run" \
        --checkpoint-dir "$ckpt" --set parallel.dp=2 --set parallel.tp=1 --set parallel.pp=1 \
        --set "data.path=$data" --set "train.steps=$steps" --set train.eval_every=0 \
        --set train.eval_batches=1 --set "checkpoint.every=$every" "$@" >"$WORK/$label.launch.log" 2>&1; then
        summarize "$run" "$label" || FAILURES+=("train-$label")
        du -sh "$ckpt"/step-* 2>/dev/null | tail -n 1 | sed 's/^/  last checkpoint on disk: /'
    else
        log "train $label: FAILED; tail of $WORK/$label.launch.log:"
        tail -n 20 "$WORK/$label.launch.log" >&2
        FAILURES+=("train-$label")
    fi
}

if has_case train; then
    TINY_DATA="data/synth-quickstart"
    BIG_DATA="data/synth-bench-512"
    [[ -f "$TINY_DATA/manifest.json" ]] ||
        "$GANTRY_BIN" data synth --output "$TINY_DATA" --tokens 4000000 --vocab-size 128 --support 32 --seed 1
    [[ -f "$BIG_DATA/manifest.json" ]] ||
        "$GANTRY_BIN" data synth --output "$BIG_DATA" --tokens 4000000 --vocab-size 512 --seed 1
    train_case tiny "$TINY_DATA" 40 10 --set train.global_batch=32 --set train.micro_batch=8
    train_case 20m "$BIG_DATA" 8 2 --set model.vocab_size=512 --set model.d_model=512 \
        --set model.n_layers=6 --set model.n_heads=8 --set model.seq_len=256 \
        --set optim.lr=6e-4 --set optim.min_lr=6e-5 --set optim.warmup_steps=2 \
        --set train.global_batch=8 --set train.micro_batch=2
fi

if [[ ${#FAILURES[@]} -gt 0 ]]; then
    log "failed cases: ${FAILURES[*]}"
    exit 1
fi
