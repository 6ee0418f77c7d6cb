#!/usr/bin/env bash
# scripts/bench-allreduce-vs-mpi.sh: gantry all_reduce next to Open MPI, same
# machine, same run, one case after another (never two at once).
#
#   bash scripts/bench-allreduce-vs-mpi.sh [--json]
#
# Bandwidth section (f32, sum, WORLD ranks, each size in SIZES):
#   1. gantry, TCP          gantry bench collectives --transport tcp
#   2. Open MPI, TCP        mpirun --mca btl tcp,self --mca pml ob1 (forced TCP)
#   3. gantry, shm          gantry bench collectives --transport shm
#   4. Open MPI, default    mpirun with its defaults (shared memory: vader)
# Latency section (f32, LAT_SIZE bytes, many iterations), for each world size
# in LAT_WORLDS and each transport, LAT_ROUNDS paired rounds: gantry then Open
# MPI back to back (shm: gantry shm, Open MPI default; tcp: gantry tcp, Open
# MPI TCP), so each pair sees the same machine; then the next round.
# Then it prints side-by-side tables: bus bandwidth (GB/s, nccl-tests
# definition, 2(n-1)/n x algbw) with gantry/openmpi ratios, and median
# latency (us): one row per world size and transport, every round's median
# for both side by side, the median over rounds, and speedup = openmpi /
# gantry. In both, > 1 means gantry is faster. Both programs report the
# median per-iteration time.
#
# --json: stdout gets every result line (one JSON object per line, as the
# programs printed it plus a "run" key naming the case); the tables and
# progress go to stderr.
#
# Environment (defaults in brackets):
#   SIZES [64M,256M]  WORLD [2]  ITERS [20]  WARMUP [3]       bandwidth section
#   LAT_SIZE [1K]  LAT_WORLDS ["2 4"]  LAT_ROUNDS [3]  LAT_ITERS [5000]
#   LAT_WARMUP [200]
#   LATENCY [1]          0 skips the latency section
#   BANDWIDTH [1]        0 skips the bandwidth section
#   IMPLS ["gantry openmpi"]   e.g. IMPLS=openmpi runs only the Open MPI half
#   CASE_TIMEOUT [900]   seconds per case before it is killed (and failed)
#   BENCH_OUT [target/bench/allreduce-vs-mpi/<timestamp>]  raw outputs
#   GANTRY_SKIP_BUILD=1  do not (re)build target/release/gantry in setup
#   GANTRY_BIN, GANTRY_MPI_ALLREDUCE   override the binaries
#
# Open MPI notes: `--allow-run-as-root` because CI runs as root;
# `--oversubscribe` because WORLD/LAT_WORLDS may exceed the core count (2 here).
# Shared memory single copy: vader's default for large messages is CMA
# (process_vm_readv), which some containers forbid (ptrace restrictions,
# seccomp, no CAP_SYS_PTRACE); Open MPI then prints a CMA/ptrace warning or
# fails. A 2-rank probe runs first; only when it shows such an error is
# OMPI_MCA_btl_vader_single_copy_mechanism=none exported (large messages then
# go through vader's copy-in/copy-out buffers). Set that variable yourself to
# force either choice. On the project machines CMA works, so Open MPI keeps
# its fastest (single-copy) path.
#
# Exit status: 1 when a case failed, timed out or reported ok=false.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_args "$@"

SIZES=${SIZES:-64M,256M}
WORLD=${WORLD:-2}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-3}
LAT_SIZE=${LAT_SIZE:-1K}
LAT_WORLDS=${LAT_WORLDS:-${LAT_WORLD:-2 4}}
LAT_ROUNDS=${LAT_ROUNDS:-3}
LAT_ITERS=${LAT_ITERS:-5000}
LAT_WARMUP=${LAT_WARMUP:-200}
LATENCY=${LATENCY:-1}
BANDWIDTH=${BANDWIDTH:-1}
IMPLS=${IMPLS:-gantry openmpi}
CASE_TIMEOUT=${CASE_TIMEOUT:-900}

has_impl() { [[ " $IMPLS " == *" $1 "* ]]; }

command -v python3 >/dev/null 2>&1 || die "python3 is needed to parse the results"

# ------------------------------------------------------------------ setup
log "setup"
bash scripts/setup.sh >&2
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ $TARGET_DIR = /* ]] || TARGET_DIR="$REPO/$TARGET_DIR"
GANTRY_BIN=${GANTRY_BIN:-$TARGET_DIR/release/gantry}
MPI_BENCH=${GANTRY_MPI_ALLREDUCE:-$TARGET_DIR/peers/mpi_allreduce}

MPIRUN=(mpirun --allow-run-as-root --oversubscribe)

# CMA probe (see the header).
if [[ -z ${OMPI_MCA_btl_vader_single_copy_mechanism:-} ]] && has_impl openmpi; then
    probe_rc=0
    probe=$(timeout 120 "${MPIRUN[@]}" -np 2 "$MPI_BENCH" --sizes 1M --iters 2 --warmup 1 \
        --json 2>&1) || probe_rc=$?
    if grep -qiE 'cma|process_vm|ptrace|single.copy' <<<"$probe"; then
        log "Open MPI cannot use CMA here; exporting OMPI_MCA_btl_vader_single_copy_mechanism=none"
        export OMPI_MCA_btl_vader_single_copy_mechanism=none
    elif [[ $probe_rc -ne 0 ]]; then
        printf '%s\n' "$probe" >&2
        die "Open MPI probe run failed (exit $probe_rc)"
    fi
fi
MPI_TCP=(--mca btl "tcp,self" --mca pml ob1)

OUT=${BENCH_OUT:-$TARGET_DIR/bench/allreduce-vs-mpi/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RECORDS="$OUT/records.jsonl"
: >"$RECORDS"
FAILURES=()

# run_case LABEL CMD...: run one case; its stdout goes to $OUT/LABEL.out and
# its JSON lines (those starting with `{`) into $RECORDS with "run": LABEL.
run_case() {
    local label=$1
    shift
    log "$label: $*"
    local rc=0 start=$SECONDS
    timeout --kill-after=30 "$CASE_TIMEOUT" "$@" >"$OUT/$label.out" || rc=$?
    python3 - "$label" "$OUT/$label.out" "$RECORDS" <<'PY'
import json, sys
label, src, dst = sys.argv[1:4]
with open(src) as f, open(dst, "a") as out:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        rec["run"] = label
        out.write(json.dumps(rec) + "\n")
PY
    if [[ $rc -ne 0 ]]; then
        [[ $rc -eq 124 || $rc -eq 137 ]] && log "$label: timed out after ${CASE_TIMEOUT}s"
        log "$label: FAILED (exit $rc); output in $OUT/$label.out"
        FAILURES+=("$label")
    else
        log "$label: done ($((SECONDS - start))s)"
    fi
}

gantry_case() { # gantry_case LABEL TRANSPORT WORLD SIZES ITERS WARMUP
    local label=$1 transport=$2 world=$3 sizes=$4 iters=$5 warmup=$6
    if [[ ! -x $GANTRY_BIN ]]; then
        log "$label: FAILED: $GANTRY_BIN not found (build it: bash scripts/setup.sh)"
        FAILURES+=("$label")
        return 0
    fi
    run_case "$label" "$GANTRY_BIN" bench collectives --op all_reduce --world "$world" \
        --transport "$transport" --dtype f32 --sizes "$sizes" --iters "$iters" \
        --warmup "$warmup" --json
}

mpi_case() { # mpi_case LABEL tcp|default WORLD SIZES ITERS WARMUP
    local label=$1 mode=$2 world=$3 sizes=$4 iters=$5 warmup=$6
    local mca=()
    [[ $mode == tcp ]] && mca=("${MPI_TCP[@]}")
    run_case "$label" "${MPIRUN[@]}" -np "$world" "${mca[@]}" "$MPI_BENCH" \
        --sizes "$sizes" --iters "$iters" --warmup "$warmup" --dtype f32 --json
}

# ------------------------------------------------------------------ context
{
    echo "# host: $(nproc) cores, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# open mpi: $(mpirun --version 2>/dev/null | head -n1)"
    echo "# vader single copy: ${OMPI_MCA_btl_vader_single_copy_mechanism:-default (cma)}"
    if [[ -x $GANTRY_BIN ]]; then
        echo "# gantry: $("$GANTRY_BIN" --version 2>/dev/null || echo '?') ($GANTRY_BIN)"
    fi
    echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# raw outputs: $OUT"
} >&2

# ------------------------------------------------------------------ runs
if [[ $BANDWIDTH == 1 ]]; then
    if has_impl gantry; then gantry_case gantry-tcp tcp "$WORLD" "$SIZES" "$ITERS" "$WARMUP"; fi
    if has_impl openmpi; then mpi_case openmpi-tcp tcp "$WORLD" "$SIZES" "$ITERS" "$WARMUP"; fi
    if has_impl gantry; then gantry_case gantry-shm shm "$WORLD" "$SIZES" "$ITERS" "$WARMUP"; fi
    if has_impl openmpi; then mpi_case openmpi-shm default "$WORLD" "$SIZES" "$ITERS" "$WARMUP"; fi
fi

# Labels: lat-w<world>-r<round>-<impl>-<transport>.
if [[ $LATENCY == 1 ]]; then
    for ((round = 1; round <= LAT_ROUNDS; round++)); do
        for w in $LAT_WORLDS; do
            for t in shm tcp; do
                mode=$t
                [[ $t == shm ]] && mode=default
                if has_impl gantry; then
                    gantry_case "lat-w$w-r$round-gantry-$t" "$t" "$w" "$LAT_SIZE" "$LAT_ITERS" "$LAT_WARMUP"
                fi
                if has_impl openmpi; then
                    mpi_case "lat-w$w-r$round-openmpi-$t" "$mode" "$w" "$LAT_SIZE" "$LAT_ITERS" "$LAT_WARMUP"
                fi
            done
        done
    done
fi

# ------------------------------------------------------------------ report
if [[ $JSON == 1 ]]; then
    cat "$RECORDS"
    report_fd=2
else
    report_fd=1
fi

rc_report=0
python3 - "$RECORDS" "$WORLD" "$LAT_WORLDS" "$LAT_SIZE" "$LATENCY" "$BANDWIDTH" "$LAT_ROUNDS" \
    "${FAILURES[@]}" <<'PY' >&"$report_fd" || rc_report=$?
import json, sys

path, world, lat_worlds, lat_size, latency, bandwidth, lat_rounds = sys.argv[1:8]
failed = set(sys.argv[8:])
recs = []
with open(path) as f:
    for line in f:
        if line.strip():
            recs.append(json.loads(line))

bad = [r for r in recs if r.get("ok") is not True]

def by_run(run):
    return {int(r["bytes"]): r for r in recs if r.get("run") == run}

def size_str(b):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)

def num(r, key, fmt):
    if r is None:
        return "-"
    s = format(float(r[key]), fmt)
    return s if r.get("ok") is True else s + "!"

def ratio(a, b):
    if a is None or b is None or not float(b):
        return "-"
    return f"{float(a) / float(b):.2f}x"

def status(run):
    return " (FAILED)" if run in failed else ""

def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(c).rjust(w) for c, w in zip(row, widths))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))

if bandwidth == "1":
    # bandwidth
    runs = ["gantry-tcp", "openmpi-tcp", "gantry-shm", "openmpi-shm"]
    data = {run: by_run(run) for run in runs}
    sizes = sorted({b for d in data.values() for b in d})
    print()
    print(f"all_reduce f32 sum, world {world}: bus bandwidth GB/s (higher is better); "
          "ratio = gantry / openmpi")
    rows = []
    for b in sizes:
        gt, ot, gs, os_ = (data[r].get(b) for r in runs)
        rows.append([
            size_str(b),
            num(gt, "busbw_gbps", ".3f"), num(ot, "busbw_gbps", ".3f"),
            ratio(gt and gt["busbw_gbps"], ot and ot["busbw_gbps"]),
            num(gs, "busbw_gbps", ".3f"), num(os_, "busbw_gbps", ".3f"),
            ratio(gs and gs["busbw_gbps"], os_ and os_["busbw_gbps"]),
        ])
    table(["size", "gantry tcp" + status("gantry-tcp"), "openmpi tcp" + status("openmpi-tcp"),
           "ratio", "gantry shm" + status("gantry-shm"), "openmpi shm" + status("openmpi-shm"),
           "ratio"], rows)
    print()
    print("median time_us per case:")
    rows = []
    for b in sizes:
        rows.append([size_str(b)] + [num(data[r].get(b), "time_us", ".1f") for r in runs])
    table(["size"] + runs, rows)

# latency
if latency == "1":
    def median(xs):
        xs = sorted(xs)
        n = len(xs)
        return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)

    def round_times(w, impl, t):
        out = []
        for r in range(1, int(lat_rounds) + 1):
            run = f"lat-w{w}-r{r}-{impl}-{t}"
            rec = next(iter(by_run(run).values()), None)
            ok = rec is not None and rec.get("ok") is True and run not in failed
            out.append(float(rec["time_us"]) if ok else None)
        return out

    def fmt_rounds(xs):
        return " / ".join("-" if x is None else f"{x:.2f}" for x in xs)

    print()
    print(f"all_reduce f32 sum, {lat_size}: median time_us per run (lower is better), "
          f"{lat_rounds} paired rounds (gantry then openmpi, same transport, back to back); "
          "speedup = openmpi / gantry over the medians of the rounds")
    rows = []
    for w in lat_worlds.split():
        for t, mpi_name in (("shm", "default (vader)"), ("tcp", "tcp")):
            g, o = round_times(w, "gantry", t), round_times(w, "openmpi", t)
            if all(x is None for x in g + o):
                continue
            gm = median([x for x in g if x is not None])
            om = median([x for x in o if x is not None])
            rows.append([w, t, fmt_rounds(g), mpi_name, fmt_rounds(o),
                         "-" if gm is None else f"{gm:.2f}", "-" if om is None else f"{om:.2f}",
                         ratio(om, gm)])
    table(["world", "transport", "gantry rounds", "openmpi", "openmpi rounds",
           "gantry", "openmpi", "speedup"], rows)

if bad:
    print()
    print("results marked ! reported ok=false:",
          ", ".join(f"{r['run']} {size_str(int(r['bytes']))}" for r in bad))
sys.exit(1 if bad else 0)
PY

if [[ ${#FAILURES[@]} -gt 0 ]]; then
    log "failed cases: ${FAILURES[*]}"
    exit 1
fi
exit "$rc_report"
