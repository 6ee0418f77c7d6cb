"""PyTorch eager peer for `scripts/bench-gpu.sh`: the same GPT-2 style model gantry
trains (learned positions, LayerNorm, GELU tanh, tied embeddings, biases), bf16 autocast with
fp32 weights, SDPA attention (flash on GPU), fused AdamW; tokens/s and MFU measured the same
way: MFU = (6·N + 12·L·d·T) · tokens/s ÷ 989e12, N without the position embedding.

    python torch_gpt_mfu.py --d-model 768 --layers 12 --heads 12 --batch 16 --steps 30

What is measured, so the comparison with gantry is like for like:
- The learning rate is constant (3e-4, no warmup or decay); AdamW betas (0.9, 0.95), weight
  decay 0.1 on matrices, gradient clipping at norm 1.0.
- One batch of random tokens is made on the device before the loop and reused every step:
  batch preparation and the host-to-device copy are not timed.
- A step is timed from a device synchronize to the next, forward, backward, clipping, the
  update and zeroing the gradients included; the first `--warmup` steps are left out and the
  reported step time is the median of the rest (the upper median for an even count).

`--device cpu` runs the same loop on the CPU (bf16 CPU autocast, no synchronize, MFU null):
it proves the script runs where no GPU is; its figures mean nothing.

Prints one JSON object.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK = 989e12


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, seq):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    a = ap.parse_args()
    dev = a.device
    on_gpu = dev == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = GPT(a.vocab, a.d_model, a.layers, a.heads, a.seq).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * (n_params - a.seq * a.d_model) + 12 * a.layers * a.d_model * a.seq
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), fused=True,
    )
    x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev)
    times = []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tps = a.batch * a.seq / step_s
    print(json.dumps({
        "impl": "pytorch-eager",
        "device": dev,
        "params": n_params,
        "d_model": a.d_model, "layers": a.layers, "heads": a.heads, "batch": a.batch, "seq": a.seq,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tps,
        "mfu": flops_per_token * tps / PEAK if on_gpu else None,
        "loss": loss.detach().item(),
    }))


if __name__ == "__main__":
    main()
