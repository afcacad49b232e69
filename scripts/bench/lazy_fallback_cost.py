#!/usr/bin/env python3
"""What the lazy reference's exact fallback costs (forward kernels 3/5 in bf16, cuda/ffa_fwd_overlap.cu):
flexcp's forward (kernel 5) against the exact-max forward (kernel 0) on shape (a) of attention_bench.py
(S=8192, Hq=32, Hkv=8, D=64, causal) with ordinary inputs and with inputs whose rows the lazy reference
hands to its one-warp-per-row recompute: "jump" (keys after the first 128 scaled by 40: the scores of
nearly every row jump by hundreds of log2 units after its first key tile) and "large" (q and k times 8:
row maxima of 100-300, the first rows of each item jump). Prints milliseconds of each kernel and the
largest difference between their outputs (the fallback is exact, so it stays at bf16 rounding).
    FFA_LIB=build-ffa/libffa.so python3 scripts/bench/lazy_fallback_cost.py [--json FILE]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ffa_lib  # noqa: E402
from attention_bench import bench_ms  # noqa: E402  (the benchmark's own timer: do_bench median)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    S, hq, hkv, d = 8192, 32, 8, 64
    plan0 = ffa_lib.Plan([(0, S, 0, S, "causal")], S, S)
    plan5 = ffa_lib.Plan([(0, S, 0, S, "causal")], S, S, fwd_tile_q=ffa_lib.forward_tile_q(5, d))
    results = []
    for case in ("ordinary", "jump", "large"):
        torch.manual_seed(0)
        q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if case == "jump":
            k[128:] *= 40
        elif case == "large":
            q, k = 8 * q, 8 * k
        o0, l0 = ffa_lib.forward(plan0, q, k, v, kernel=0)
        o5, l5 = ffa_lib.forward(plan5, q, k, v, kernel=5)
        ms0 = bench_ms(lambda: ffa_lib.forward(plan0, q, k, v, out=o0, lse=l0, kernel=0))
        ms5 = bench_ms(lambda: ffa_lib.forward(plan5, q, k, v, out=o5, lse=l5, kernel=5))
        r = {"case": case, "kernel0_ms": ms0, "kernel5_ms": ms5, "kernel5_over_kernel0": ms5 / ms0,
             "max_out_diff": (o5.float() - o0.float()).abs().max().item(),
             "max_lse_diff": (l5 - l0).abs().max().item(), "nan": bool(torch.isnan(o5).any() or torch.isnan(l5).any())}
        results.append(r)
        print(f"{case:9s} kernel 0 {ms0:9.3f} ms  kernel 5 {ms5:9.3f} ms  ({ms5 / ms0:6.2f}x)  "
              f"max|out5 - out0| {r['max_out_diff']:.2e}  max|lse5 - lse0| {r['max_lse_diff']:.2e}  NaN {r['nan']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
