#!/usr/bin/env python3
"""The SASS of one kernel from `cuobjdump -sass` output (stdin), and a count of its opcodes.

    cuobjdump -sass build-ffa/ffa_fwd_overlap.o | python3 scripts/dev/sass_extract.py PATTERN

PATTERN: a substring of the kernel's mangled name, e.g. fwd_overlap_kernelI13__nv_bfloat16Li64ELb1 (forward
kernel 5, bf16, D=64). Prints the function's listing, then its opcodes by count (the opcode is the first
word of an instruction, with its modifiers, e.g. MUFU.EX2, F2FP.BF16.F32.PACK_AB). Exits 1 if no function
matches, 2 if several do.
"""
import collections
import re
import sys


def main():
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    functions, name, body = {}, None, []
    for line in sys.stdin:
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                functions[name] = body
            name, body = m.group(1), []
        elif name:
            body.append(line.rstrip("\n"))
    if name:
        functions[name] = body
    hits = [n for n in functions if pattern in n]
    if not hits:
        print(f"sass_extract: no function matches {pattern!r} ({len(functions)} read)", file=sys.stderr)
        sys.exit(1)
    if len(hits) > 1:
        print(f"sass_extract: {len(hits)} functions match {pattern!r}: " + ", ".join(hits), file=sys.stderr)
        sys.exit(2)
    ops = collections.Counter()
    print(f"Function : {hits[0]}")
    for line in functions[hits[0]]:
        print(line)
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1)] += 1
    print(f"\n# {sum(ops.values())} instructions by opcode")
    for op, n in ops.most_common():
        print(f"{n:6d} {op}")


if __name__ == "__main__":
    main()
