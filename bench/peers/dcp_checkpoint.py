"""PyTorch `torch.distributed.checkpoint` (DCP) peer for `scripts/bench-checkpoint.sh`: the
checkpoint `gantry bench checkpoint` saves, saved and loaded by DCP on CPU with gloo.

The same tensors: f32 `[rows, 1024]`, split by rows over `--ranks` ranks, the per-rank slices
cycling through 256, 64, 192 and 128 MiB until each rank holds its share of `--gib` GiB. Each
rank holds its row block as a DTensor sharded on dim 0 over a gloo device mesh, as FSDP/TP
state dicts are.

Per repetition:
  save         R gloo ranks `dcp.save` (barrier before, barrier after; rank 0's wall time)
  load_same    the same R ranks `dcp.load` into DTensors of the same layout
  load_reshard one process without a process group loads every whole tensor (R -> 1)
Every load is checked element by element against what was saved (not timed). The page cache is
warm, as in gantry's rows. Prints one JSON object: seconds per repetition for each operation.

    python dcp_checkpoint.py --dir /tmp/x --gib 1 --ranks 2 --repeat 3
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

COLS = 1024
ROW_BYTES = COLS * 4
MIB = 1 << 20
SLICE_MIB = [256, 64, 192, 128]


def plan(per_rank_bytes):
    """Rows per rank of each tensor, as gantry's bench plans them."""
    rows, left = [], per_rank_bytes // ROW_BYTES
    while left > 0:
        r = min(SLICE_MIB[len(rows) % len(SLICE_MIB)] * MIB // ROW_BYTES, left)
        rows.append(r)
        left -= r
    return rows


def content(tensor, first_row, rows):
    """Deterministic, non-constant f32 rows of tensor `tensor`, by global element index."""
    idx = torch.arange(first_row * COLS, (first_row + rows) * COLS, dtype=torch.int64)
    x = (idx * 2654435761 + tensor * 40503) % (1 << 24)
    return (x.to(torch.float32) / float(1 << 24) - 0.5).view(rows, COLS)


def rank_main(rank, ranks, port, rows, ckpt, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    local = {f"layers.{i}.weight": content(i, r * rank, r) for i, r in enumerate(rows)}

    def as_dtensors(tensors):
        return {k: DTensor.from_local(v, mesh, [Shard(0)], run_check=False) for k, v in tensors.items()}

    state = as_dtensors(local)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save(state, checkpoint_id=ckpt)
    dist.barrier()
    save_s = time.perf_counter() - t0

    target = as_dtensors({k: torch.empty_like(v) for k, v in local.items()})
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(target, checkpoint_id=ckpt)
    dist.barrier()
    load_same_s = time.perf_counter() - t0
    for k, v in local.items():
        if not torch.equal(target[k].to_local(), v):
            raise SystemExit(f"rank {rank}: {k} loaded (same layout) differs from what was saved")
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"save_s": save_s, "load_same_s": load_same_s}, f)
    dist.destroy_process_group()


def load_reshard(rows, ranks, ckpt):
    """One process, no process group: every whole tensor (R -> 1)."""
    target = {f"layers.{i}.weight": torch.empty(r * ranks, COLS) for i, r in enumerate(rows)}
    t0 = time.perf_counter()
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    s = time.perf_counter() - t0
    for i, r in enumerate(rows):
        if not torch.equal(target[f"layers.{i}.weight"], content(i, 0, r * ranks)):
            raise SystemExit(f"layers.{i}.weight loaded (resharded) differs from what was saved")
    return s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="scratch directory (a fresh sub-directory is used and removed)")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    per_rank = int(args.gib * (1 << 30)) // args.ranks // ROW_BYTES * ROW_BYTES
    if per_rank == 0:
        sys.exit(f"--gib {args.gib} is too small for {args.ranks} ranks")
    rows = plan(per_rank)
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dcp-bench-", dir=args.dir)
    samples = {"save": [], "load_same": [], "load_reshard": []}
    try:
        for rep in range(args.repeat):
            ckpt = os.path.join(work, f"step-{rep}")
            out_file = os.path.join(work, "rank0.json")
            mp.spawn(rank_main, args=(args.ranks, free_port(), rows, ckpt, out_file), nprocs=args.ranks, join=True)
            with open(out_file) as f:
                r0 = json.load(f)
            samples["save"].append(r0["save_s"])
            samples["load_same"].append(r0["load_same_s"])
            samples["load_reshard"].append(load_reshard(rows, args.ranks, ckpt))
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "peer": f"torch.distributed.checkpoint (torch {torch.__version__}, gloo, DTensor Shard(0))",
        "bytes": per_rank * args.ranks,
        "ranks": args.ranks,
        "tensors": len(rows),
        "threads": torch.get_num_threads(),
        "samples_s": samples,
    }))


if __name__ == "__main__":
    main()
