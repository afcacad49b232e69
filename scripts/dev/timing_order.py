#!/usr/bin/env python3
"""Does forward kernel 5's rate at D=128 depend on what ran before it? Times kernels in a fixed order on
one attention_bench.py shape, several times each, with the bench's method (triton do_bench, L2 flushed).
    FFA_LIB=build-ffa/libffa.so python3 scripts/dev/timing_order.py "b: S=8192 Hq=Hkv=16 D=128 causal" 5,5,5,3,5,0,5
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import attention_bench  # noqa: E402
import ffa_lib  # noqa: E402

shape = sys.argv[1]
order = [int(k) for k in sys.argv[2].split(",")]
sh = next(s for s in attention_bench.shapes() if shape in s["name"])
S, hq, hkv, d = sh["S"], sh["hq"], sh["hkv"], sh["d"]
torch.manual_seed(0)
q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mask = "full" if sh["kind"] == "full" else "causal"
plans = {kern: ffa_lib.Plan([(0, S, 0, S, mask)], S, S, fwd_tile_q=ffa_lib.forward_tile_q(kern, d)) for kern in set(order)}
flops = 4.0 * d * hq * plans[order[0]].stats()["visible_pairs"]
out = torch.empty_like(q)
lse = torch.empty(S, hq, device="cuda", dtype=torch.float32)
for kern in set(order):
    ffa_lib.forward(plans[kern], q, k, v, kernel=kern)
for prealloc in (False, True):
    line = []
    for kern in order:
        kw = dict(out=out, lse=lse) if prealloc else {}
        ms = attention_bench.bench_ms(lambda kern=kern: ffa_lib.forward(plans[kern], q, k, v, kernel=kern, **kw))
        line.append(f"k{kern} {flops / ms / 1e9:.0f}")
    print(("preallocated out: " if prealloc else "fresh out:         ") + ", ".join(line), flush=True)
