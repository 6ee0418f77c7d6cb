#!/usr/bin/env bash
# scripts/bench-train-gpu.sh: single-H200 GPT training throughput, gantry next to PyTorch
# eager in the same run (shared/GPU.md host). Not part of CI; the device tool runs it.
#
# On the development machine:
#   cargo build --release -p gantry && mkdir -p .gpu && strip -o .gpu/gantry target/release/gantry
#   (stripped: ~28 MB against ~200 MB with debug info; the device tool carries 64 MiB at most;
#   /.gpu/ is listed in .git/info/exclude)
# Then on the GPU host, from the repository root (with .gpu/ carried):
#   bash scripts/bench-train-gpu.sh [OUT_DIR]
#
# For each configuration the issue names — 124M (d768 L12 h12 B16), 350M (d1024 L24 h16 B8),
# 1.3B (d2048 L24 h16 B8), vocab 50304, seq 1024, bf16 autocast, fused AdamW — it runs
# `gantry launch --local 1` with train.device = "cuda" and bench/peers/torch_gpt_mfu.py, and
# prints tokens/s and MFU = (6·N + 12·L·d·T)·tokens/s ÷ 989e12 side by side (median step after
# 5 warm-up steps, on both sides). JSON and run directories go to OUT_DIR (default $OUT or
# /tmp/gantry-gpu-bench).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${1:-${OUT:-/tmp/gantry-gpu-bench}}"
mkdir -p "$OUT_DIR"
GANTRY="${GANTRY_BIN:-$REPO/.gpu/gantry}"
[[ -x $GANTRY ]] || { echo "bench-train-gpu.sh: $GANTRY missing (build and copy it, see the header)" >&2; exit 1; }
P=/opt/torch/.venv/lib/python3.12/site-packages
PY=/opt/torch/.venv/bin/python
mkdir -p /tmp/nccl && ln -sf "$P/nvidia/nccl/lib/libnccl.so.2" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH="/tmp/nccl:$P/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
STEPS="${GANTRY_BENCH_STEPS:-30}"
WARMUP=5

DATA=/tmp/gantry-gpu-bench-data
[[ -f $DATA/manifest.json ]] || "$GANTRY" data synth --output "$DATA" --tokens 40000000 --vocab-size 50304 --seed 1 >&2
cat >"$OUT_DIR/job.toml" <<SPEC
name = "gpu-bench"
[model]
arch = "gpt2"
vocab_size = 50304
seq_len = 1024
tie_embeddings = true
[data]
path = "$DATA"
valid_fraction = 0.0
[train]
device = "cuda"
steps = $((STEPS + WARMUP))
SPEC

# Both sides are timed the same way: the median step over the steps after a 5-step warm-up
# (the peer's own rule). gantry's steps come from its metrics.jsonl; update_ms is the part of
# its step after backward (norm, clipping, AdamW), where the time goes if it falls short.
# gantry_row NAME RUN_DIR: one table line from a run's metrics.jsonl.
gantry_row() {
    "$PY" - "$@" "$WARMUP" <<'PYEOF'
import json, statistics, sys
name, run, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.startswith('{"step"')]
rows = [r for r in rows if r["step"] > warmup] or rows
ms = statistics.median(r["step_ms"] for r in rows)
upd = statistics.median(r.get("update_ms", 0.0) for r in rows)
tokens = rows[0]["tokens_per_s"] * rows[0]["step_ms"] / 1e3
mfu = (rows[0].get("mfu") or 0.0) * rows[0]["step_ms"] / ms
params = json.load(open(f"{run}/summary.json"))["params"]
print(f"{name:<6} {'gantry':<10} {tokens / ms * 1e3:>12.0f} {100 * mfu:>7.1f}% {ms:>12.1f} {upd:>10.1f} {params:>11}")
PYEOF
}
# torch_row NAME JSON: one table line from the peer's JSON.
torch_row() {
    "$PY" - "$@" <<'PYEOF'
import json, sys
name, path = sys.argv[1:]
s = json.load(open(path))
print(f"{name:<6} {'torch':<10} {s['tokens_per_s']:>12.0f} {100 * s['mfu']:>7.1f}% {s['step_ms']:>12.1f} {'-':>10} {s['params']:>11}")
PYEOF
}

printf '%-6s %-10s %12s %8s %12s %10s %11s\n' model impl tokens/s MFU step_ms update_ms params
for cfg in "124M 768 12 12 16" "350M 1024 24 16 8" "1.3B 2048 24 16 8"; do
    read -r name d l h b <<<"$cfg"
    run="$OUT_DIR/run-$name"
    if "$GANTRY" launch "$OUT_DIR/job.toml" --local 1 --run-dir "$run" --json \
        --set model.d_model="$d" --set model.n_layers="$l" --set model.n_heads="$h" \
        --set train.global_batch="$b" --set train.micro_batch="$b" >"$OUT_DIR/gantry-$name.json" 2>"$OUT_DIR/gantry-$name.err"; then
        gantry_row "$name" "$run"
    else
        echo "$name gantry FAILED: $(tail -3 "$OUT_DIR/gantry-$name.err")"
    fi
    if "$PY" bench/peers/torch_gpt_mfu.py --d-model "$d" --layers "$l" --heads "$h" --batch "$b" --steps "$STEPS" \
        >"$OUT_DIR/torch-$name.json" 2>"$OUT_DIR/torch-$name.err"; then
        torch_row "$name" "$OUT_DIR/torch-$name.json"
    else
        echo "$name torch FAILED: $(tail -3 "$OUT_DIR/torch-$name.err")"
    fi
done
