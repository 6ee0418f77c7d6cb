#!/usr/bin/env bash
# scripts/bench-data-vs-megatron.sh: gantry's data reader next to the way Megatron-LM reads
# the same shards (numpy memmap + per-sample concatenate, bench/peers/megatron_read.py), one
# after the other in one run, single-threaded, warm page cache.
#
#   bash scripts/bench-data-vs-megatron.sh
#
# Environment: TOKENS [20000000] (synthetic dataset size), SEQ_LEN [1024], BATCH [8],
# BENCH_SECONDS [5], DATA_DIR [target/bench/data-<TOKENS>] (created with `gantry data synth` if absent).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh >&2
TOKENS=${TOKENS:-20000000}
SEQ_LEN=${SEQ_LEN:-1024}
BATCH=${BATCH:-8}
SECONDS_=${BENCH_SECONDS:-5}
DATA_DIR=${DATA_DIR:-target/bench/data-$TOKENS}
GANTRY=target/release/gantry
PY=.tools/py/bin/python
if [[ ! -f $DATA_DIR/manifest.json ]]; then
    mkdir -p "$(dirname "$DATA_DIR")"
    "$GANTRY" data synth --output "$DATA_DIR" --tokens "$TOKENS" --seed 1 >&2
fi
gantry_json=$("$GANTRY" data bench "$DATA_DIR" --seq-len "$SEQ_LEN" --batch "$BATCH" --seconds "$SECONDS_" --json)
peer_json=$("$PY" bench/peers/megatron_read.py "$DATA_DIR" --seq-len "$SEQ_LEN" --batch "$BATCH" --seconds "$SECONDS_")
echo "$gantry_json"
echo "$peer_json"
python3 - "$gantry_json" "$peer_json" <<'PY'
import json, sys
g, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"\nreader tokens/s, seq_len {g['seq_len']}, batch {g['batch']}, one thread, warm page cache")
print(f"  gantry          {g['tokens_per_s'] / 1e6:8.1f} M tokens/s   (memcpy in the same run: {g['memcpy_gbps']:.2f} GB/s)")
print(f"  megatron-numpy  {p['tokens_per_s'] / 1e6:8.1f} M tokens/s   (memcpy in the same run: {p['memcpy_gbps']:.2f} GB/s)")
print(f"  gantry / megatron-numpy = {g['tokens_per_s'] / p['tokens_per_s']:.1f}x")
PY
