#!/usr/bin/env bash
# scripts/bench-cluster.sh: control-plane figures, with torchrun's rendezvous next to
# gantry's submit-to-first-step in the same run.
#
#   bash scripts/bench-cluster.sh [--json]
#
# 1. scale    gantry bench cluster: a real `gantry coordinator` process and WORKERS
#             simulated workers (tonic clients in one process, 16 HTTP/2 connections)
#             heartbeating every second: p50/p99 heartbeat latency and coordinator CPU,
#             idle and with a RANKS-rank job placed; submit time of that job and the
#             placement function alone.
# 2. startup  gantry bench startup: coordinator + one worker daemon + 4 training ranks
#             on this host; time from `gantry submit` to every rank's first step.
# 3. torchrun the peer: `torchrun --standalone --nproc-per-node 4` of a script that
#             runs init_process_group(gloo) + barrier; time from launch to rank 0 past
#             the barrier (Python start, torch import, rendezvous). Uses TORCH_PYTHON, or
#             .tools/torch-venv with torch's Python dependencies added; skipped when
#             PyTorch does not import (the CUDA wheel without NVIDIA's libraries here).
#
# Environment (defaults in brackets):
#   WORKERS [10000]  RANKS [100000]  SECONDS [10]  REPEAT [3]
#   GANTRY_SKIP_BUILD=1   do not (re)build target/release/gantry in setup
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_args "$@"

WORKERS=${WORKERS:-10000}
RANKS=${RANKS:-100000}
SECONDS_PER_PHASE=${SECONDS:-10}
REPEAT=${REPEAT:-3}

bench_setup
JSON_ARG=()
[[ $JSON == 1 ]] && JSON_ARG=(--json)

log "scale: $WORKERS simulated workers, a $RANKS-rank job"
slots=$(((RANKS + WORKERS - 1) / WORKERS))
"$GANTRY_BIN" bench cluster --workers "$WORKERS" --slots "$slots" --ranks "$RANKS" \
    --seconds "$SECONDS_PER_PHASE" "${JSON_ARG[@]}"

log "startup: gantry submit → first step, 4 ranks"
"$GANTRY_BIN" bench startup --nproc 4 --repeat "$REPEAT" "${JSON_ARG[@]}"

log "torchrun: rendezvous of 4 local processes"
VENV="$REPO/.tools/torch-venv"
PY=${TORCH_PYTHON:-$VENV/bin/python}
if ! "$PY" -c "import torch.distributed" 2>/dev/null && [[ -z ${TORCH_PYTHON:-} ]]; then
    log "pip install torch's Python dependencies into .tools/torch-venv"
    "$PY" -m pip install --quiet --disable-pip-version-check \
        typing_extensions sympy networkx jinja2 fsspec filelock >&2 || true
fi
if ! err=$("$PY" -c "import torch.distributed" 2>&1); then
    # The wheel setup installs is the CUDA build without NVIDIA's libraries (enough for
    # libtorch, not for `import torch`); set TORCH_PYTHON to a Python with PyTorch.
    echo "torchrun: skipped, PyTorch does not import with $PY: $(tail -n1 <<<"$err")"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/rdzv.py" <<'PY'
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:
    print(f"{time.time() - float(os.environ['T0']):.3f}")
dist.destroy_process_group()
PY
times=()
for _ in $(seq "$REPEAT"); do
    t0=$(python3 -c 'import time; print(time.time())')
    t=$(T0=$t0 OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 4 "$WORK/rdzv.py" 2>/dev/null | tail -n1)
    times+=("$t")
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((REPEAT + 1) / 2))p")
if [[ $JSON == 1 ]]; then
    printf '{"torchrun_rendezvous_s": [%s], "median_s": %s}\n' "$(IFS=,; echo "${times[*]}")" "$median"
else
    echo "torchrun --standalone, 4 processes: launch → init_process_group(gloo) + barrier: median ${median} s of ${times[*]}"
fi
