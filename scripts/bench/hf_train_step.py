#!/usr/bin/env python3
"""The reference training step of issue 7: HF transformers LlamaForCausalLM with the Llama-3.2-1B
shape, random init, one micro-batch of SEQ tokens per optimizer step, fused torch AdamW.

    python3 scripts/bench/hf_train_step.py [--seq 8192] [--mode amp_fp32_master|pure_bf16] [--iters 8]

Prints one JSON line: step_ms (median of --iters timed steps after 3 warm-up steps), tokens_per_s,
mfu (6N + causal attention FLOPs per token over 989 TFLOP/s, the convention of ../shared/anchors),
peak_mem_gib (torch.cuda.max_memory_allocated, weights and optimizer state included).
Same method as ../shared/anchors/hf_llama_baseline.py, so the numbers are comparable with it.
"""
import argparse
import json

import torch
from transformers import LlamaForCausalLM

from hf_llama import llama32_1b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mode", default="amp_fp32_master", choices=["amp_fp32_master", "pure_bf16"])
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = llama32_1b()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    if args.mode == "pure_bf16":
        model = model.to(torch.bfloat16)
    nparam = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.mode == "amp_fp32_master"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    ms = times[len(times) // 2]
    tok_s = args.seq / (ms / 1e3)
    flops_tok = 6 * nparam + 6 * cfg.num_hidden_layers * args.seq * cfg.num_attention_heads * cfg.head_dim
    print(json.dumps({"runner": "hf", "mode": args.mode, "seq": args.seq, "step_ms": ms, "tokens_per_s": tok_s,
                      "mfu": flops_tok * tok_s / 989e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "params": nparam, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
