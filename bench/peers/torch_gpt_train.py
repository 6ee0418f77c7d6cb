"""PyTorch eager peer for `scripts/bench-train-cpu.sh --peer`: gantry's CPU GPT-2 training
(`train/src/model.rs`, arch gpt2) written the way a PyTorch user would, fp32 on the CPU.

Mirrors gantry's model and step:
- learned positions, pre-norm LayerNorm with bias (eps `--norm-eps`, gantry's 1e-5), one QKV
  Linear with bias, SDPA causal attention, GELU (tanh), MLP 4·d, tied input/output embedding;
- init: Normal(0, 0.02) for the embeddings, QKV and MLP-in weights, Normal(0, 0.02/√(2L)) for
  the attention-out and MLP-out weights, LayerNorm ones/zeros, biases zeros (gantry's values
  come from its own per-tensor seeds, so the numbers differ, the distributions do not);
- AdamW (`torch.optim.AdamW(fused=True)`), betas (0.9, 0.95), eps 1e-8, weight decay on the
  weights and both embeddings (wte, wpe) only, not on norms or biases (gantry's `decay` flags);
- global gradient-norm clipping at `--grad-clip` (1.0);
- gantry's learning-rate schedule: linear warm-up over `--warmup` steps, cosine to `--min-lr`
  at `--steps` (`train/src/optim.rs: learning_rate`);
- the step's micro-batches (`global_batch / world / micro_batch`) each add loss / micro to the
  gradients; with `--spawn N` (N ranks started here by torch.multiprocessing.spawn) or `--ddp`
  (run under `python -m torch.distributed.run --nproc-per-node N`) gloo DDP averages them over
  the ranks, skipping the all-reduce (`no_sync`) on all but the
  last micro-batch as gantry does; the step loss is the mean over micro-batches, then over
  ranks (one small all-reduce, as gantry's `step_loss`).

Data: random windows of seq+1 tokens from the dataset gantry trains on (`gantry data synth`
output: Megatron-style `.bin` token shards, dtype from `manifest.json`), read through a numpy
memmap. The sample order is not gantry's; throughput is what is compared.

Measured like gantry's `summary.json` (`train/src/reporter.rs`, `train/src/trainer.rs`): a
step is timed from fetching its batch to the end of the loss all-reduce after the optimizer
step; tokens/s of a step = global_batch · seq / step time; `tokens_per_s` and `step_ms` are
the means over the steps after the first (all steps when there is only one). Rank 0 reports.

Threads: `torch.set_num_threads(--threads)` (default: cores / ranks on this host, at least 1,
as gantry resolves `train.threads = 0`) and one inter-op thread, as `gantry rank` sets them.
`OMP_WAIT_POLICY` is read by libgomp at process start, so it is whatever the environment
says (the bench script copies what gantry's rank log reported for the same case); printed.

    python torch_gpt_train.py --data data/synth-quickstart --vocab 128 --d-model 128 \
        --layers 2 --heads 4 --seq 128 --global-batch 32 --micro-batch 8 --steps 20
    python torch_gpt_train.py --spec runs/bench-train-cpu/peer/tiny-dp1.spec.toml
    python torch_gpt_train.py --spawn 2 --spec runs/bench-train-cpu/peer/tiny-dp2.spec.toml
    python -m torch.distributed.run --standalone --nproc-per-node 2 torch_gpt_train.py --ddp ...

torchrun starts each worker in a session of its own; `--spawn` keeps the ranks in the caller's
session, as `gantry launch --local` does (it matters on a shared host whose kernel schedules
by session, sched_autogroup_enabled=1: see scripts/bench-train-cpu.sh).

`--spec` takes every size, optimizer and batch setting (and the data path and threads) from
the resolved `spec.toml` gantry writes into its run directory, so both train the same job;
flags given as well override it.

Prints one JSON object (rank 0).
"""
import argparse
import json
import math
import os
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"u8": np.uint8, "u16": np.uint16, "u32": np.uint32, "i32": np.int32, "i64": np.int64,
          "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "int32": np.int32,
          "int64": np.int64}


class Block(nn.Module):
    def __init__(self, d, h, eps):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.fc = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, seq, eps, std):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, eps) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        out_std = std / math.sqrt(2 * layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                elif name.endswith(("out.weight", "down.weight")):
                    p.normal_(0.0, out_std)
                else:
                    p.normal_(0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:t]
        for blk in self.blocks:
            x = blk(x)
        # Tied: the output embedding is wte itself.
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def learning_rate(lr, min_lr, warmup, step, total):
    """gantry's `optim::learning_rate`: `step` counts from 0."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup or step >= total:
        return min_lr
    progress = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class Windows:
    """Random windows of `seq + 1` tokens over a dataset's `.bin` shards."""

    def __init__(self, path, seq, seed):
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        dtype = DTYPES[manifest["dtype"]]
        self.vocab = int(manifest["vocab_size"])
        self.shards = [np.memmap(os.path.join(path, s["prefix"] + ".bin"), dtype=dtype, mode="r")
                       for s in manifest["shards"]]
        self.shards = [s for s in self.shards if len(s) > seq + 1]
        if not self.shards:
            raise SystemExit(f"{path}: no shard holds {seq + 1} tokens")
        sizes = np.array([len(s) - seq - 1 for s in self.shards], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.seq = seq
        self.rng = np.random.default_rng(seed)

    def batch(self, n):
        """Inputs and next-token targets, `[n, seq]` int64 each (contiguous, as gantry's)."""
        out = np.empty((n, self.seq + 1), dtype=np.int64)
        which = self.rng.choice(len(self.shards), size=n, p=self.p)
        for i, s in enumerate(which):
            shard = self.shards[s]
            start = int(self.rng.integers(0, len(shard) - self.seq - 1))
            out[i] = shard[start:start + self.seq + 1]
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def spec_defaults(path):
    """Argument defaults from gantry's resolved `spec.toml` (arch gpt2 only)."""
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    m, o, t = spec.get("model", {}), spec.get("optim", {}), spec.get("train", {})
    if m.get("arch", "gpt2") != "gpt2":
        raise SystemExit(f"{path}: model.arch {m['arch']!r}: this peer is the gpt2 architecture")
    if not m.get("tie_embeddings", True):
        raise SystemExit(f"{path}: this peer ties the embeddings; the spec does not")
    if m.get("ffn_hidden", 0) not in (0, 4 * m.get("d_model", 0)):
        raise SystemExit(f"{path}: this peer's MLP is 4·d; the spec sets ffn_hidden {m['ffn_hidden']}")
    picks = {
        "data": spec.get("data", {}).get("path"),
        "vocab": m.get("vocab_size"), "vocab_multiple": m.get("vocab_multiple"),
        "d_model": m.get("d_model"), "layers": m.get("n_layers"), "heads": m.get("n_heads"),
        "seq": m.get("seq_len"), "norm_eps": m.get("norm_eps"), "init_std": m.get("init_std"),
        "lr": o.get("lr"), "min_lr": o.get("min_lr"), "warmup": o.get("warmup_steps"),
        "weight_decay": o.get("weight_decay"), "beta1": o.get("beta1"), "beta2": o.get("beta2"),
        "eps": o.get("eps"), "grad_clip": o.get("grad_clip"),
        "global_batch": t.get("global_batch"), "micro_batch": t.get("micro_batch"),
        "steps": t.get("steps"), "seed": t.get("seed"), "threads": t.get("threads"),
    }
    return {k: v for k, v in picks.items() if v is not None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", help="gantry's resolved spec.toml: defaults for everything below")
    ap.add_argument("--data", help="gantry dataset directory (manifest.json)")
    ap.add_argument("--vocab", type=int, default=0,
                    help="vocabulary (gantry's padded size); 0 = manifest's, padded to --vocab-multiple")
    ap.add_argument("--vocab-multiple", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--min-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = cores / ranks")
    ap.add_argument("--ddp", action="store_true", help="gloo DDP under torch.distributed.run")
    ap.add_argument("--spawn", type=int, default=0, metavar="N",
                    help="gloo DDP over N local ranks started here (torch.multiprocessing.spawn)")
    pre, _ = ap.parse_known_args()
    if pre.spec:
        ap.set_defaults(**spec_defaults(pre.spec))
    a = ap.parse_args()
    if not a.data:
        ap.error("--data (or --spec) is required")
    if a.spawn > 0:
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        a.ddp = True
        mp.spawn(spawned_rank, args=(a, port), nprocs=a.spawn, join=True)
        return
    train(a)


def spawned_rank(rank, a, port):
    """One rank of `--spawn N`: torchrun's variables, then the run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(a.spawn),
                      LOCAL_WORLD_SIZE=str(a.spawn), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(a)


def train(a):
    world, rank, local_world = 1, 0, 1
    if a.ddp:
        import torch.distributed as dist
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = a.threads if a.threads > 0 else max(1, cores // local_world)
    # As `gantry rank` does: intra-op threads, one inter-op thread (before any parallel work).
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if a.ddp:
        dist.init_process_group("gloo")

    if a.global_batch % (world * a.micro_batch) != 0:
        raise SystemExit(f"global batch {a.global_batch} is not a multiple of "
                         f"ranks {world} × micro-batch {a.micro_batch}")
    micro = a.global_batch // (world * a.micro_batch)
    data = Windows(a.data, a.seq, a.seed * 1000 + rank)
    vocab = a.vocab or -(-data.vocab // a.vocab_multiple) * a.vocab_multiple

    torch.manual_seed(a.seed)
    model = GPT(vocab, a.d_model, a.layers, a.heads, a.seq, a.norm_eps, a.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    # gantry's decay flags: weights and embeddings, not norms or biases.
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and ".ln" not in n
             and not n.startswith("ln_f")]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and ".ln" not in n
                                                               and not n.startswith("ln_f"))]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    net = model
    if a.ddp:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, fused=True,
    )

    step_s, update_s, losses = [], [], []
    for step in range(a.steps):
        t0 = time.perf_counter()
        inputs, targets = data.batch(micro * a.micro_batch)
        loss_sum = 0.0
        for mb in range(micro):
            rows = slice(mb * a.micro_batch, (mb + 1) * a.micro_batch)
            last = mb + 1 == micro
            if a.ddp and not last:
                with net.no_sync():
                    loss = net(inputs[rows], targets[rows])
                    (loss / micro).backward()
            else:
                loss = net(inputs[rows], targets[rows])
                (loss / micro).backward()
            loss_sum += loss.item()
        t1 = time.perf_counter()
        lr = learning_rate(a.lr, a.min_lr, a.warmup, step, a.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_loss = torch.tensor([loss_sum / micro], dtype=torch.float64)
        if a.ddp:
            dist.all_reduce(step_loss)
            step_loss /= world
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        update_s.append(t2 - t1)
        losses.append(float(step_loss))

    # gantry's reporter: the first step is left out of the means unless it is the only one.
    counted = step_s[1:] if len(step_s) > 1 else step_s
    counted_u = update_s[1:] if len(update_s) > 1 else update_s
    tokens_per_step = a.global_batch * a.seq
    out = {
        "impl": "pytorch-eager" + ("-ddp-gloo" if a.ddp else ""),
        "torch": torch.__version__,
        "ranks": world,
        "params": n_params,
        "vocab": vocab,
        "d_model": a.d_model, "layers": a.layers, "heads": a.heads, "seq": a.seq,
        "global_batch": a.global_batch, "micro_batch": a.micro_batch, "micro_batches": micro,
        "steps": a.steps,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
        "tokens_per_s": sum(tokens_per_step / s for s in counted) / len(counted),
        "step_ms": 1e3 * sum(counted) / len(counted),
        "update_ms": 1e3 * sum(counted_u) / len(counted_u),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": [round(x, 4) for x in losses],
    }
    if rank == 0:
        print(json.dumps(out), flush=True)
    if a.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
