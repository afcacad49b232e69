#!/usr/bin/env python3
"""Counts a few SASS instruction kinds in a cubin without a disassembler (this machine's CUDA has
neither cuobjdump nor nvdisasm): per kernel, the number of instructions, HGMMA (split into the
shared-memory-A and register-A forms), MUFU, and local-memory loads/stores (spills) with the source
lines they come from (needs -lineinfo; read through binutils' DWARF line decoder).

    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I. --expt-relaxed-constexpr -lineinfo \\
         -cubin cuda/ffa_fwd_overlap.cu -o /tmp/k.cubin && python3 scripts/dev/cubin_ops.py /tmp/k.cubin

The opcodes are the low 12 bits of each 16-byte sm_90 instruction. They are not documented: HGMMA's
two values were found by compiling 1, 2 and 5 wgmma (SS) and one RS wgmma into test kernels and
seeing which counts follow; STL/LDL/MUFU are the usual published sm_8x/sm_9x encodings. Treat the
counts as a check of what you expect (e.g. HGMMA = GEMM sites x k-steps), not as a disassembly.
"""
import bisect
import collections
import re
import struct
import subprocess
import sys

OPS = {0x9F0: "HGMMA.SS", 0xDF0: "HGMMA.RS", 0x308: "MUFU", 0x387: "STL", 0x983: "LDL"}


def sections(data):
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    for name, _typ, _flags, _addr, offset, size in secs:
        yield data[strtab + name:data.index(b"\0", strtab + name)].decode(), offset, size


def line_table(path):
    """(address, file, line) rows of the cubin's DWARF line program, sorted by address. The addresses
    restart at 0 in every kernel, so the table is unambiguous only for a cubin with one kernel."""
    out = subprocess.run(["objdump", "--dwarf=decodedline", path], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[1].isdigit() and re.match(r"^(0x[0-9a-f]+|0)$", f[2]):
            rows.append((int(f[2], 16), f[0], int(f[1])))
    return sorted(rows)


def main():
    path = sys.argv[1]
    data = open(path, "rb").read()
    kernels = [(n, o, s) for n, o, s in sections(data) if n.startswith(".text.")]
    rows = line_table(path) if len(kernels) == 1 else []
    keys = [r[0] for r in rows]
    for name, offset, size in kernels:
        ops = [struct.unpack_from("<Q", data, offset + k)[0] & 0xFFF for k in range(0, size, 16)]
        count = collections.Counter(ops)
        print(f"{name[6:]}\n  instructions {len(ops)}, " + ", ".join(f"{v} {count[k]}" for k, v in OPS.items()))
        for k, op in enumerate(ops):
            if op in (0x387, 0x983):
                i = bisect.bisect_right(keys, 16 * k) - 1
                where = f"{rows[i][1]}:{rows[i][2]}" if i >= 0 else "(compile a single kernel for source lines)"
                print(f"  {OPS[op]} at 0x{16 * k:x} {where}")


if __name__ == "__main__":
    main()
