#!/usr/bin/env python3
"""One forward and one backward per given backward kernel id on one attention_bench.py shape (causal or
full; the document shape runs causal), for profilers: scripts/bench/profile_bwd.sh wraps it in ncu.
    python3 scripts/bench/bwd_once.py "a: S=8192" 5,1
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_bench  # noqa: E402
import ffa_lib  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "a: S=8192"
kernels = [int(k) for k in (sys.argv[2] if len(sys.argv) > 2 else "5").split(",")]
sh = next(s for s in attention_bench.shapes() if shape in s["name"])
S, hq, hkv, d = sh["S"], sh["hq"], sh["hkv"], sh["d"]
torch.manual_seed(0)
q, dout = (torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
plan = ffa_lib.Plan([(0, S, 0, S, "full" if sh["kind"] == "full" else "causal")], S, S)
out, lse = ffa_lib.forward(plan, q, k, v)
for kern in kernels:
    print(f"== backward kernel {kern} on {sh['name']}", flush=True)
    ffa_lib.backward(plan, dout, q, k, v, out, lse, kernel=kern)
torch.cuda.synchronize()
