#!/usr/bin/env python3
"""The HF transformers side of the loss check of issue 7 (scripts/bench/loss-vs-hf.sh).

    hf_loss_run.py init --out DIR [--seed 0]
        a random Llama-3.2-1B-shaped LlamaForCausalLM saved as an HF folder (fp32 safetensors), the
        common starting point: flexcp trains from it with `model.from: DIR`.
    hf_loss_run.py train --init DIR --config RESOLVED.yaml --windows W.npy --out RUN_DIR
        trains it on the windows `flexcp batches` exported (same data, same order), with the
        optimizer settings of the resolved flexcp config (`flexcp train ... --dry-run`): AdamW with
        decay on matrices only, warm-up then cosine/linear/constant to min_lr as core/lr_schedule.cpp,
        gradient clipping, grad accumulation over micro-batches; bf16 autocast with fp32 weights and
        optimizer state (HF's usual mixed precision). Writes RUN_DIR/metrics.jsonl in flexcp's format so
        `flexcp compare` reads it.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaForCausalLM

from hf_llama import llama32_1b


def lr_at(t, step):  # the formula of core/lr_schedule.cpp
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    if t["schedule"] == "constant":
        return t["lr"]
    decay_steps = max(1, t["steps"] - t["warmup"] - 1)
    progress = min(1.0, (step - t["warmup"]) / decay_steps)
    if t["schedule"] == "linear":
        return t["lr"] - (t["lr"] - t["min_lr"]) * progress
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def init(args):
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama32_1b())
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"saved a random Llama-3.2-1B-shaped model (seed {args.seed}) to {args.out}")


def train(args):
    t = yaml.safe_load(open(args.config))["train"]
    windows = torch.from_numpy(np.load(args.windows).astype(np.int64))
    gb, mb = t["global_batch"], t["micro_batch"]
    steps = args.steps or t["steps"]
    if windows.shape[0] < steps * gb:
        raise SystemExit(f"{args.windows}: {windows.shape[0]} windows, need steps x global_batch = {steps * gb}")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = LlamaForCausalLM.from_pretrained(args.init, torch_dtype=torch.float32).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"], fused=True)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    tokens_per_step = gb * t["seq_len"]
    for step in range(steps):
        start = time.time()
        lr = lr_at(t, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for m in range(0, gb, mb):
            w = windows[step * gb + m: step * gb + m + mb].cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=w[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
            (loss / tokens_per_step).backward()
            loss_sum += loss.item()
        gnorm = torch.nn.utils.clip_grad_norm_(params, t["grad_clip"]) if t["grad_clip"] > 0 else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        ms = (time.time() - start) * 1e3
        rec = {"step": step + 1, "loss": loss_sum / tokens_per_step, "lr": lr, "grad_norm": float(gnorm),
               "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tokens_per_step / (ms / 1e3), "step_ms": ms}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % 25 == 0:
            print(f"hf step {step + 1}/{steps} loss {rec['loss']:.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("init")
    a.add_argument("--out", required=True)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("train")
    b.add_argument("--init", required=True)
    b.add_argument("--config", required=True)
    b.add_argument("--windows", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    init(args) if args.cmd == "init" else train(args)


if __name__ == "__main__":
    main()
