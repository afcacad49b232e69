#!/usr/bin/env python3
"""Coefficients of the polynomial exp2 of forward kernel 4 (cuda/ffa_fwd_overlap.cu, exp2_poly; the
constants live in cuda/ffa_exp2_poly.h): the minimax approximation of 2^f on [0, 1] in relative error,
p(f) = 1 + c1 f + c2 f^2 + c3 f^3, with the constant term fixed at 1 so that p(0) = 1 exactly (integer x,
and -inf clamped to -127, come out exact: 2^n and +0). The kernel reduces x to f = x - floor(x) in
[0, 1) (FlashAttention-4's reduction; centring f in [-0.5, 0.5] instead would put the fixed p(0) = 1 at
the middle of the interval, where the unconstrained minimax error has an extremum, not a zero: 4.3e-4
instead of 8.6e-5 at degree 3). Remez exchange in mpmath (no numpy here); prints the coefficients
rounded to float32 (decimal and hex) and the minimax error. scripts/dev/exp2_poly_check.cpp then checks
the kernel's float32 arithmetic with these constants over every float32 in [-127, 8].

    python3 scripts/dev/exp2_poly_fit.py [degree]   (default 3; degree 2: 2.1e-3, degree 4: 2.9e-6)
"""
import struct
import sys

import mpmath as mp

mp.mp.dps = 40
LO, HI = mp.mpf(0), mp.mpf(1)


def err(c, x):
    """Relative error of 1 + c1 x + ... at x."""
    p = 1 + sum(ck * x ** (k + 1) for k, ck in enumerate(c))
    return p / mp.power(2, x) - 1


def solve(ref, deg):
    """Coefficients and level E with err(x_i) = (-1)^i E at the deg + 1 reference points."""
    rows, rhs = [], []
    for i, x in enumerate(ref):
        e = mp.power(2, x)
        rows.append([x ** (k + 1) for k in range(deg)] + [-((-1) ** i) * e])
        rhs.append(e - 1)
    sol = mp.lu_solve(mp.matrix(rows), mp.matrix(rhs))
    return [sol[k] for k in range(deg)], sol[deg]


def extrema(c, n=4000):
    """Local extrema of |err| on a grid (with the end points), in order."""
    xs = [LO + (HI - LO) * i / n for i in range(n + 1)]
    es = [err(c, x) for x in xs]
    out = []
    for i in range(n + 1):
        left = es[i - 1] if i > 0 else None
        right = es[i + 1] if i < n else None
        a = abs(es[i])
        if (left is None or a >= abs(left)) and (right is None or a >= abs(right)) and xs[i] != 0:
            out.append((xs[i], es[i]))
    return out


def remez(deg, iters=30):
    ref = [LO + (HI - LO) * (1 - mp.cos(mp.pi * i / deg)) / 2 for i in range(deg + 1)]
    ref = [x if x != 0 else mp.mpf("1e-3") for x in ref]
    for _ in range(iters):
        c, level = solve(ref, deg)
        ext = extrema(c)
        # Keep deg + 1 extrema of alternating sign, largest first within each run of one sign.
        alt = []
        for x, e in ext:
            if alt and mp.sign(alt[-1][1]) == mp.sign(e):
                if abs(e) > abs(alt[-1][1]):
                    alt[-1] = (x, e)
            else:
                alt.append((x, e))
        while len(alt) > deg + 1:  # drop the smaller end
            alt.pop(0 if abs(alt[0][1]) < abs(alt[-1][1]) else -1)
        if len(alt) < deg + 1:
            break
        ref = [x for x, _ in alt]
    return c, max(abs(e) for _, e in extrema(c))


def f32(x):
    b = struct.pack("<f", float(x))
    return struct.unpack("<f", b)[0], "0x" + b[::-1].hex()


def main():
    deg = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    c, e = remez(deg)
    print(f"degree {deg}: minimax relative error {mp.nstr(e, 4)} on [0, 1]")
    for k, ck in enumerate(c):
        v, h = f32(ck)
        print(f"  c{k + 1} = {v!r:<24} ({h})")


if __name__ == "__main__":
    main()
