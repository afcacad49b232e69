#!/usr/bin/env python3
"""SM clock, power and TFLOP/s of flexcp's default forward and of SDPA's forward, each run back to back
for a few seconds (after a warm-up), while nvidia-smi samples the card every 50 ms: whether the two run
at the same clock, i.e. whether a ratio of TFLOP/s is a ratio of work per cycle or partly one of power.
    FFA_LIB=build-ffa/libffa.so python3 scripts/dev/clock_power.py ["a: S=8192"] [SECONDS]
"""
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import attention_bench  # noqa: E402
import ffa_lib  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "a: S=8192"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
sh = next(s for s in attention_bench.shapes() if shape in s["name"])
if sh["kind"] not in ("causal", "full"):
    sys.exit(f"clock_power.py: shape '{sh['name']}' is {sh['kind']}; pick a causal or full shape")
S, hq, hkv, d = sh["S"], sh["hq"], sh["hkv"], sh["d"]
torch.manual_seed(0)
q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mask = sh["kind"]
kernel = 5
plan = ffa_lib.Plan([(0, S, 0, S, mask)], S, S, fwd_tile_q=ffa_lib.forward_tile_q(kernel, d))
qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
pairs = S * (S + 1) / 2 if mask == "causal" else S * S
flops = 4 * pairs * hq * d

runs = {
    "ours": lambda: ffa_lib.forward(plan, q, k, v, kernel=kernel),
    "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask == "causal", enable_gqa=hq != hkv),
}

smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits",
                        "-lms", "50"], stdout=subprocess.PIPE, text=True)
samples = []  # (time, clock MHz, power W, temperature C)


def read_samples():
    for line in smi.stdout:  # until nvidia-smi is terminated
        try:
            c, p, t = (float(x) for x in line.split(","))
        except ValueError:
            continue
        samples.append((time.time(), c, p, t))


def run_for(fn, secs):
    """Calls fn in batches of 20 until secs have passed; returns (start, end) wall times and TFLOP/s."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.time(), 0
    start.record()
    while time.time() - t0 < secs:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return t0, time.time(), flops * calls / (start.elapsed_time(end) * 1e-3) / 1e12


threading.Thread(target=read_samples, daemon=True).start()
for fn in runs.values():
    run_for(fn, 1.0)  # warm-up
print(f"{sh['name']}, {seconds:.0f} s each, twice, in turns:")
for _ in range(2):
    for name, fn in runs.items():
        t0, t1, tflops = run_for(fn, seconds)
        win = [s for s in samples if t0 + 0.5 <= s[0] <= t1]
        if not win:
            print(f"  {name}: {tflops:.1f} TFLOP/s (no nvidia-smi samples)")
            continue
        clk = sum(s[1] for s in win) / len(win)
        pw = sum(s[2] for s in win) / len(win)
        print(f"  {name}: {tflops:.1f} TFLOP/s at {clk:.0f} MHz, {pw:.0f} W, {win[-1][3]:.0f} C "
              f"({len(win)} samples): {tflops / clk * 1000:.1f} TFLOP/s per GHz")
smi.terminate()
