#!/usr/bin/env python3
"""Summarize ncu's per-instruction warp stall samples (SASS_CSV= of scripts/bench/profile_fwd.sh or
profile_bwd.sh): the instructions and source lines where warps wait most, with their main stall reasons.
    python3 scripts/dev/sass_stalls.py FILE.csv[.gz] [TOP]
The CSV holds one table per source file ("File Path" row, then a header row with "Warp Stall Sampling (All
Samples)"): a row per CUDA line (address '-') followed by its SASS instructions. Shares are of all samples.
"""
import csv
import gzip
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path):
    """(file, line, cuda_source, address, sass, samples, {reason: samples}) per row; a CUDA line's row has
    address '-', an instruction's row carries the last CUDA line above it (its source line)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    out, header, file, line, cuda = [], None, "", "", ""
    for row in rows:
        if len(row) == 2 and row[0] == "File Path":
            file = row[1].rsplit("/", 1)[-1]
        elif SAMPLES in row:
            header = row
        elif header and len(row) == len(header):
            get = dict(zip(["line", "cuda", "address", "sass"], row[:4]))
            col = header.index(SAMPLES)
            reasons = {h.replace("stall_", ""): number(row[i]) for i, h in enumerate(header)
                       if h.startswith("stall_") and "Not Issued" not in h}
            if get["address"].strip() in ("", "-"):
                line, cuda = get["line"], get["cuda"].strip()
                out.append((file, line, cuda, "", "", number(row[col]), reasons))
            else:
                out.append((file, line, cuda, get["address"], get["sass"].strip(), number(row[col]), reasons))
    return out


def why(reasons, total):
    top = sorted(((v, k) for k, v in reasons.items() if v > 0), reverse=True)[:3]
    return ", ".join(f"{k} {v / total:.1%}" for v, k in top)


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    rows = read_rows(path)
    # An inlined instruction is listed under each file it comes from: keep one row per address, the one
    # under the kernel's own .cu file where there is one.
    by_address = {}
    for r in rows:
        if r[3] and (r[3] not in by_address or r[0].endswith(".cu") and not by_address[r[3]][0].endswith(".cu")):
            by_address[r[3]] = r
    sass = list(by_address.values())
    total = sum(r[5] for r in sass)
    print(f"{len(sass)} instructions, {total:.0f} samples (all warps of the profiled launch)")
    print("== CUDA lines by share of samples (line, source; an inlined helper's line also counts in its caller's)")
    for r in sorted((r for r in rows if not r[3]), key=lambda r: -r[5])[:top]:
        print(f"{r[5] / total:6.1%}  {r[0]}:{r[1]}  {r[2][:90]}   [{why(r[6], total)}]")
    print("== instructions by share of samples (SASS, its CUDA line)")
    for r in sorted(sass, key=lambda r: -r[5])[:top]:
        print(f"{r[5] / total:6.1%}  {r[4][:60]:<60} {r[0]}:{r[1]}   [{why(r[6], total)}]")


if __name__ == "__main__":
    main()
