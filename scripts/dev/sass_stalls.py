#!/usr/bin/env python3
"""Summarize ncu's per-instruction warp stall samples (SASS_CSV= of scripts/bench/profile_fwd.sh or
profile_bwd.sh): the instructions and source lines where warps wait most, with their main stall reasons.
    python3 scripts/dev/sass_stalls.py FILE.csv[.gz] [TOP]
The CSV holds one table per view (SASS, CUDA source); a table starts at a header row that has the column
"Warp Stall Sampling (All Samples)". Rows are printed by share of all samples of their table.
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


def read_tables(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    tables, header, body = [], None, []
    for row in rows:
        if SAMPLES in row:
            if header:
                tables.append((header, body))
            header, body = row, []
        elif header and len(row) == len(header):
            body.append(row)
    if header:
        tables.append((header, body))
    return tables


def label_of(header, row):
    names = ["Address", "Source", "Line", "# Line", "Line No", "File Path"]
    parts = [row[header.index(n)].strip() for n in names if n in header and row[header.index(n)].strip()]
    return " | ".join(parts)[:150]


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    for header, body in read_tables(path):
        col = header.index(SAMPLES)
        stalls = [i for i, h in enumerate(header) if "stall" in h.lower() and h != SAMPLES and "Not-issued" not in h]
        total = sum(number(r[col]) for r in body)
        if total == 0:
            continue
        print(f"== table with columns {header[:3]}...: {len(body)} rows, {total:.0f} samples")
        for r in sorted(body, key=lambda r: -number(r[col]))[:top]:
            share = number(r[col]) / total
            reasons = sorted(((number(r[i]), header[i]) for i in stalls), reverse=True)[:3]
            why = ", ".join(f"{h.replace('stall_', '')} {v / total:.1%}" for v, h in reasons if v > 0)
            print(f"{share:6.1%}  {label_of(header, r)}   [{why}]")


if __name__ == "__main__":
    main()
