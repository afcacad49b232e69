// Constants of forward kernel 4's polynomial exp2 (cuda/ffa_fwd_overlap.cu, exp2_poly), in a plain
// header so that the CPU check (scripts/dev/exp2_poly_check.cpp) evaluates the same numbers.
//
//   2^x = 2^n * p(f),  n = floor(x), f = x - n in [0, 1),  p(f) = 1 + c1 f + c2 f^2 + c3 f^3
//
// p is the relative-error minimax polynomial of 2^f on [0, 1] with p(0) = 1 fixed (Remez exchange:
// scripts/dev/exp2_poly_fit.py; max relative error 8.6e-5 before float32 rounding). p(0) = 1 makes
// integer x exact and turns x = -127 (where -inf is clamped) into the bit pattern of +0.
#pragma once

namespace ffa {
namespace exp2_poly_constants {

constexpr float kC1 = 0x1.63e658p-1f;  // 0.69511676
constexpr float kC2 = 0x1.d2378ap-3f;  // 0.22764499
constexpr float kC3 = 0x1.3baaa6p-4f;  // 0.07706704
// x + kRound rounded down has floor(x) in its low mantissa bits (the ulp of kRound is 1; the 2^22 bit
// keeps a negative floor from borrowing into the exponent), for |x| < 2^22.
constexpr float kRound = 12582912.f;  // 1.5 * 2^23
constexpr float kMin = -127.f;        // inputs are clamped here: floor(-127) + 127 = 0 is the +0 exponent

}  // namespace exp2_poly_constants
}  // namespace ffa
