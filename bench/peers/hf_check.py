#!/usr/bin/env python3
"""Load a `gantry checkpoint export` folder with Hugging Face transformers, the way anyone
would (AutoTokenizer / AutoModelForCausalLM, no extra arguments), and report what gantry's
tests compare with gantry's own answers.

    python hf_check.py REQUEST.json

REQUEST.json:
    {"model_dir": "...",
     "windows": [[id, ...], ...],     # each seq_len + 1 tokens: loss of ids[1:] given ids[:-1]
     "prompts": [[id, ...], ...],     # greedy continuation of each, one at a time
     "max_new_tokens": 16,
     "texts": ["...", ...],           # encoded and decoded by the tokenizer (if the folder has one)
     "chat": [{"role": ..., "content": ...}, ...]}  # rendered by the chat template, if any

Prints one JSON object: "loss" (mean next-token loss in nats over every window position),
"tokens", "generations" (the new tokens only; generation stops at the model's EOS, as
transformers does by default), the ids the configs carry, and with a tokenizer "encoded",
"decoded" (each text's ids decoded with special tokens skipped), "tokenizer_class" and "chat"
(the messages rendered by the tokenizer's chat template; null without one).
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def loss_over(model, windows):
    """Mean next-token cross entropy over every position of every window (float64 sums)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w], dtype=torch.long)
            logits = model(input_ids=ids[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll.double())
            count += ids.size(1) - 1
    return total / max(count, 1), count


def greedy(model, prompts, max_new_tokens):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long)
            got = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            out.append(got[0, ids.size(1) :].tolist())
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        req = json.load(f)
    torch.manual_seed(0)
    folder = req["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    loss, tokens = loss_over(model, req.get("windows", []))
    report = {
        "architecture": type(model).__name__,
        "loss": loss,
        "tokens": tokens,
        "generations": greedy(model, req.get("prompts", []), req.get("max_new_tokens", 16)),
        "config_bos_token_id": model.config.bos_token_id,
        "config_eos_token_id": model.config.eos_token_id,
        "generation_bos_token_id": model.generation_config.bos_token_id,
        "generation_eos_token_id": model.generation_config.eos_token_id,
    }
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(folder)
        encoded = [tok(t)["input_ids"] for t in req.get("texts", [])]
        report.update(
            tokenizer_class=type(tok).__name__,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            encoded=encoded,
            decoded=[tok.decode(ids, skip_special_tokens=True) for ids in encoded],
            chat=tok.apply_chat_template(req["chat"], tokenize=False)
            if tok.chat_template and req.get("chat")
            else None,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
