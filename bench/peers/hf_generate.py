"""The Hugging Face transformers peer of `gantry bench registry`'s generation rows.

    python hf_generate.py EXPORT_DIR [--requests 32] [--prompt-tokens 16] [--max-tokens 64]
                                     [--concurrency 1,8] [--threads N]

Loads a `gantry checkpoint export` folder with `AutoModelForCausalLM` (CPU, f32) and
generates greedily with `model.generate` from the same prompts the gantry bench sends
(token k of request i is `(k * 31 + i * 7) % vocab`), exactly `--max-tokens` new tokens
each (`min_new_tokens` = `max_new_tokens`, as gantry's `stop_at_eod: false`). Concurrency c
is transformers' way of serving c requests at once: one `generate` call over a batch of c
prompts (equal lengths, so no padding); each request's latency is its batch's. Prints one
JSON object with the same fields as gantry's runs (tokens/s, latency p50/p99).
"""

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM


def quantile(xs, q):
    """Nearest rank, as gantry's bench computes it."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("export_dir")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.export_dir, torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompts = [[(k * 31 + i * 7) % vocab for k in range(a.prompt_tokens)] for i in range(a.requests)]
    common = dict(
        do_sample=False, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
        pad_token_id=0, eos_token_id=None,
    )
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:1]), **common)  # warm-up, not counted
        runs = []
        for c in [int(x) for x in a.concurrency.split(",")]:
            latency, tokens = [], 0
            started = time.perf_counter()
            for b in range(0, len(prompts), c):
                batch = torch.tensor(prompts[b:b + c])
                t = time.perf_counter()
                out = model.generate(batch, attention_mask=torch.ones_like(batch), **common)
                took = time.perf_counter() - t
                tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
                latency += [took] * batch.shape[0]
            wall = time.perf_counter() - started
            runs.append({
                "concurrency": c, "requests": len(latency), "tokens": tokens, "seconds": wall,
                "tokens_per_s": tokens / wall,
                "latency_p50_ms": quantile(latency, 0.5) * 1e3, "latency_p99_ms": quantile(latency, 0.99) * 1e3,
            })
    print(json.dumps({"peer": "transformers", "threads": torch.get_num_threads(), "runs": runs}))


if __name__ == "__main__":
    main()
