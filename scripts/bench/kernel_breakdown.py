#!/usr/bin/env python3
"""Sums the GPU time of one profiled training step by kind of kernel, from the CSV that

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
        flexcp train ... --profile-step N > step.csv

writes (flexcp brackets step N with cudaProfilerStart/Stop). Kernels run one at a time under ncu,
so the sum is the step's GPU time without overlap; the shares are what to optimise first.

    python3 scripts/bench/kernel_breakdown.py step.csv [--json out.json] [--top 15]
"""
import argparse
import csv
import json
import re
import sys
from collections import defaultdict

# First match wins. Names are the demangled kernel names ncu prints.
KINDS = [
    ("attention forward (ffa)", r"ffa.*fwd|fwd.*ffa"),
    ("attention backward (ffa)", r"ffa.*bwd|bwd.*ffa|ffa.*preprocess|ffa.*dq"),
    ("attention other (ffa)", r"ffa"),
    ("attention (torch sdpa)", r"flash|fmha|attention|cudnn"),
    ("GEMM (cuBLAS)", r"gemm|sm90_xmma|nvjet|cutlass|gemv|xmma"),
    ("cross-entropy (fused)", r"cross_entropy|xent"),
    ("RMSNorm (fused)", r"rms_?norm"),
    ("RoPE (fused)", r"rope"),
    ("SwiGLU (fused)", r"swiglu|silu_mul"),
    ("optimizer (fused)", r"adamw|optim"),
    ("reductions (torch)", r"reduce|norm|softmax|logsumexp|cumsum|max|sum"),
    ("copies / casts (torch)", r"copy|cast|cat|index|gather|scatter|fill|where"),
    ("element-wise (torch)", r"elementwise|vectorized|unrolled|pointwise|foreach"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--json")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    lines = open(a.csv, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"{a.csv}: no ncu CSV header (\"ID\",...) found; did ncu run with --csv and see the profiled step?")
    by_kind, by_name, count = defaultdict(float), defaultdict(float), 0
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "nsecond")
        ns = float(row["Metric Value"].replace(",", "")) * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
        name = row["Kernel Name"]
        kind = next((k for k, pat in KINDS if re.search(pat, name, re.I)), "other")
        by_kind[kind] += ns / 1e6
        by_name[name[:110]] += ns / 1e6
        count += 1
    total = sum(by_kind.values())
    print(f"{count} kernels, {total:.1f} ms of GPU time (serialised under ncu)")
    for k, ms in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"  {k:28s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    print(f"top {a.top} kernels:")
    for n, ms in sorted(by_name.items(), key=lambda x: -x[1])[: a.top]:
        print(f"  {ms:8.2f} ms  {n}")
    if a.json:
        json.dump({"kernels": count, "total_ms": total, "by_kind_ms": dict(by_kind),
                   "top_kernels_ms": dict(sorted(by_name.items(), key=lambda x: -x[1])[: a.top])}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
