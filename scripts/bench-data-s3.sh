#!/usr/bin/env bash
# scripts/bench-data-s3.sh: an s3:// dataset streamed into the data cache while it is read,
# next to raw GETs of the same bytes from the same server (s3s-fs on loopback, started here
# on a free port with throwaway keys).
#
#   bash scripts/bench-data-s3.sh [--json]
#
# 1. data     gantry data synth --output s3://bench/corpus: TOKENS tokens in shards of
#             SHARD_TOKENS (uploaded, manifest last).
# 2. reader   stream_bench (sharding/examples/stream_bench.rs), one process, one reader of
#             global batch BATCH × SEQ_LEN + 1 tokens:
#               first step: raw ranged GETs of the shards step 0 reads | a cold stream's
#                           time to its first batch (manifest, the .idx files from the
#                           upload's index pack, those shards);
#               one pass:   raw ranged GETs of every shard | cold stream (no budget) | the
#                           same cache warm | the copy read in place (local .bin) | cold
#                           stream within a budget of BUDGET_FRAC of the dataset (range
#                           mode when the dataset does not fit: byte ranges of shards,
#                           checked against the upload's block checksums, held in memory);
#                           with SHARDS_TOO=1 the same pass again streaming whole shards
#                           (the mode before range mode);
#             rates are the dataset's tokens over each case's seconds. Streaming whole
#             shards, the shard is the unit of the cache: with the global shuffle a step
#             reads up to BATCH × 2 shards, so a budget must hold a few steps' shards (hence
#             many small shards by default: 800 of 50 KB).
# 3. launch   gantry launch --local 2 (dp 2, the 2-layer model of launch/tests/s3_stream.rs,
#             STEPS steps of global batch 8 × 128 tokens) from the local copy and from s3://
#             with a cold cache: seconds from the launch to its first metrics line, and the
#             ranks' own "first step's data ready" seconds (from opening the data).
#
# --json: the reader's JSON object and the launch figures, one line each.
#
# Environment (defaults in brackets):
#   TOKENS [20000000]  SHARD_TOKENS [25000]  SEQ_LEN [1023]  BATCH [16]
#   BUDGET_FRAC [0.25]  (0: no budgeted pass)  SHARDS_TOO [0]  STEPS [5]
#   WORK [${TMPDIR:-/tmp}/gantry-bench-data-s3-<pid>]   scratch, removed at the end
#   KEEP=1                  keep WORK
#   GANTRY_SKIP_BUILD=1     build nothing: use GANTRY_BIN and STREAM_BENCH as they are
#   GANTRY_BIN [target/release/gantry]   STREAM_BENCH [target/release/examples/stream_bench]
#   GANTRY_S3S_FS [.tools/bin/s3s-fs]
#
# Exit status: 1 when a case failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_args "$@"

TOKENS=${TOKENS:-20000000}
SHARD_TOKENS=${SHARD_TOKENS:-25000}
SEQ_LEN=${SEQ_LEN:-1023}
BATCH=${BATCH:-16}
BUDGET_FRAC=${BUDGET_FRAC:-0.25}
SHARDS_TOO=${SHARDS_TOO:-0}
STEPS=${STEPS:-5}
WORK=${WORK:-${TMPDIR:-/tmp}/gantry-bench-data-s3-$$}
S3S_FS=${GANTRY_S3S_FS:-$REPO/.tools/bin/s3s-fs}
command -v python3 >/dev/null 2>&1 || die "python3 is needed (free port, timing, summary)"

if [[ ${GANTRY_SKIP_BUILD:-0} != 1 ]]; then
    bench_setup
    log "cargo build --release -p gantry-sharding --example stream_bench"
    cargo build --release -p gantry-sharding --example stream_bench >&2
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ $TARGET_DIR = /* ]] || TARGET_DIR="$PWD/$TARGET_DIR"
GANTRY_BIN=${GANTRY_BIN:-$TARGET_DIR/release/gantry}
STREAM_BENCH=${STREAM_BENCH:-$TARGET_DIR/release/examples/stream_bench}
[[ -x $GANTRY_BIN ]] || die "$GANTRY_BIN not found"
[[ -x $STREAM_BENCH ]] || die "$STREAM_BENCH not found"
[[ -x $S3S_FS ]] || die "$S3S_FS not found (bash scripts/setup.sh installs it)"

mkdir -p "$WORK"
S3_PID=""
cleanup() {
    if [[ -n $S3_PID ]]; then
        kill "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ S3 (s3s-fs)
S3_ROOT="$WORK/s3s-root"
mkdir -p "$S3_ROOT/bench"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID="bench-$$" AWS_SECRET_ACCESS_KEY="secret-$$-$RANDOM" AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
"$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_ROOT" >"$WORK/s3s-fs.log" 2>&1 &
S3_PID=$!
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    kill -0 "$S3_PID" 2>/dev/null || die "s3s-fs exited: $(tail -c 1000 "$WORK/s3s-fs.log")"
    sleep 0.1
done
log "s3s-fs on $AWS_ENDPOINT_URL (root $S3_ROOT)"

# ------------------------------------------------------------------ data
URL="s3://bench/corpus"
export GANTRY_DATA_CACHE="$WORK/synth-cache"
log "data: $TOKENS tokens in shards of $SHARD_TOKENS -> $URL"
"$GANTRY_BIN" data synth --tokens "$TOKENS" --shard-tokens "$SHARD_TOKENS" --seed 1 --output "$URL" >&2

FAILURES=()
# ------------------------------------------------------------------ reader
log "reader: stream_bench (seq_len $SEQ_LEN, batch $BATCH, budget $BUDGET_FRAC)"
READER="$WORK/reader.json"
if ! "$STREAM_BENCH" "$URL" "$WORK/reader" --seq-len "$SEQ_LEN" --batch "$BATCH" \
    --budget-frac "$BUDGET_FRAC" --shards-too "$SHARDS_TOO" >"$READER"; then
    FAILURES+=(reader)
fi

# ------------------------------------------------------------------ launch
# Seconds from the launch to the first line of metrics.jsonl, and the ranks' own figure.
first_step() { # NAME DATA CACHE
    local run="$WORK/run-$1" spec="$WORK/$1.toml"
    cat >"$spec" <<EOF
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 128
[parallel]
dp = 2
[train]
steps = $STEPS
global_batch = 8
micro_batch = 4
threads = 1
[data]
path = "$2"
EOF
    GANTRY_DATA_CACHE="$3" python3 - "$GANTRY_BIN" "$spec" "$run" <<'PY'
import json, os, re, subprocess, sys, time
gantry, spec, run = sys.argv[1:4]
t0 = time.monotonic()
p = subprocess.Popen([gantry, "launch", spec, "--local", "2", "--run-dir", run],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
first = None
while p.poll() is None or first is None:
    try:
        if first is None and os.path.getsize(os.path.join(run, "metrics.jsonl")) > 0:
            first = time.monotonic() - t0
    except OSError:
        pass
    if p.poll() is not None and first is None:
        sys.exit("launch failed")
    time.sleep(0.002)
ready = []
for r in range(2):
    log = open(os.path.join(run, "logs", f"rank-{r}.log")).read()
    m = re.search(r"first step's data ready seconds=([0-9.e-]+)", log)
    ready.append(float(m.group(1)) if m else None)
print(json.dumps({"launch_to_first_step_s": first, "ranks_first_step_data_s": ready,
                  "ok": p.returncode == 0}))
PY
}
log "launch: first step from the local copy and from $URL (cold cache)"
"$GANTRY_BIN" data synth --tokens 2000000 --shard-tokens 100000 --seed 2 --output "$WORK/local-launch" >&2
"$GANTRY_BIN" data upload "$WORK/local-launch" "s3://bench/launch" >&2
LAUNCH_LOCAL=$(first_step local "$WORK/local-launch" "$WORK/cache-local") || FAILURES+=(launch-local)
LAUNCH_S3=$(first_step s3 "s3://bench/launch" "$WORK/cache-s3") || FAILURES+=(launch-s3)

# ------------------------------------------------------------------ report
if [[ ! -s $READER ]]; then
    echo '{}' >"$READER"
fi
if [[ $JSON == 1 ]]; then
    cat "$READER"
    echo "{\"launch_local\": ${LAUNCH_LOCAL:-null}, \"launch_s3\": ${LAUNCH_S3:-null}}"
else
    python3 - "$READER" "${LAUNCH_LOCAL:-null}" "${LAUNCH_S3:-null}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ll, ls = json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name, l in [("local copy", ll), ("s3:// cold cache", ls)]:
    if l:
        ready = ", ".join(f"{x:.3f}" for x in l["ranks_first_step_data_s"] if x is not None)
        print(f"launch -> first step, {name:<17} {l['launch_to_first_step_s']:.2f} s"
              f"   (ranks: first step's data ready after {ready} s)")
if not r:
    sys.exit(0)
d, f, p = r["dataset"], r["first_step"], r["pass"]
print(f"dataset {d['url']}: {d['shards']} shards, {d['bytes']/1e6:.1f} MB, {d['tokens']} tokens")
print(f"first step ({f['shards']} shards, {f['bytes']/1e6:.1f} MB):  raw GET {f['raw_get_s']:.3f} s"
      f"   cold stream to the first batch {f['cold_stream_s']:.3f} s"
      f"  ({f['cold_stream_s']/max(f['raw_get_s'],1e-9):.2f}x)")
raw = p["raw_get"]["tokens_per_s"]
print(f"{'one pass':<34}{'seconds':>9}{'M tokens/s':>12}{'vs raw GET':>12}")
b = p.get("budget")
cases = [("raw GET of every shard", "raw_get"), ("cold stream (no budget)", "cold_stream"),
         ("warm stream", "warm_stream"), ("local .bin (in place)", "local")]
if b:
    cases.append((f"cold stream, budget {b['fraction']}", "budget"))
if p.get("budget_shards"):
    cases.append((f"  the same, whole shards", "budget_shards"))
for name, key in cases:
    c = p[key]
    print(f"{name:<34}{c['s']:>9.3f}{c['tokens_per_s']/1e6:>12.1f}{c['tokens_per_s']/raw:>11.2f}x")
for key in ["budget", "budget_shards"]:
    b = p.get(key)
    if b:
        mode = "byte ranges" if b.get("ranged") else "whole shards"
        print(f"budget ({mode}): {b['budget_bytes']/1e6:.1f} MB, peak use {b['peak_usage']/1e6:.1f} MB, "
              f"fetched {b['bytes_fetched']/1e6:.1f} MB ({b['bytes_fetched']/d['bytes']:.2f}x the dataset)")
PY
fi
if ((${#FAILURES[@]})); then
    log "failed: ${FAILURES[*]}"
    exit 1
fi
