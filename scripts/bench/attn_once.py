#!/usr/bin/env python3
"""One forward and one backward per given backward kernel id on one attention_bench.py shape (causal or
full; the document shape runs causal), for profilers: scripts/bench/profile_fwd.sh and profile_bwd.sh
wrap it in ncu.
    python3 scripts/bench/attn_once.py "a: S=8192" 5,1 [FWD_KERNEL]
The forward runs kernel FWD_KERNEL (default 5, flexcp's; its plan is built with that kernel's q tile);
an empty backward list ("") runs the forward alone.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_bench  # noqa: E402
import ffa_lib  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "a: S=8192"
kernels = [int(k) for k in (sys.argv[2] if len(sys.argv) > 2 else "5").split(",") if k]
fwd_kernel = int(sys.argv[3]) if len(sys.argv) > 3 else 5
sh = next(s for s in attention_bench.shapes() if shape in s["name"])
S, hq, hkv, d = sh["S"], sh["hq"], sh["hkv"], sh["d"]
torch.manual_seed(0)
q, dout = (torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mask = "full" if sh["kind"] == "full" else "causal"
fwd_plan = ffa_lib.Plan([(0, S, 0, S, mask)], S, S, fwd_tile_q=ffa_lib.forward_tile_q(fwd_kernel, d))
print(f"== forward kernel {fwd_kernel} on {sh['name']}", flush=True)
out, lse = ffa_lib.forward(fwd_plan, q, k, v, kernel=fwd_kernel)
plan = ffa_lib.Plan([(0, S, 0, S, mask)], S, S)
for kern in kernels:
    print(f"== backward kernel {kern} on {sh['name']}", flush=True)
    ffa_lib.backward(plan, dout, q, k, v, out, lse, kernel=kern)
torch.cuda.synchronize()
