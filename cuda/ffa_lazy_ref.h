// The lazy reference's rule for a row's sum (forward kernels 3/5 in bf16, cuda/ffa_fwd_overlap.cu: rows
// subtract a reference that is not their max, and only their sums l are watched). A plain header (no CUDA
// needed) so that the CPU tests check the same arithmetic the kernel runs (test/ffa_lazy_ref_test.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FFA_LAZY_HD __host__ __device__
#else
#define FFA_LAZY_HD
#endif

namespace ffa {

struct LazyRef {
  static constexpr float kBias = 50.f;                 // a row's first reference: its max + kBias (largest P 2^-50)
  static constexpr float kRescaleAbove = 0x1p-20f;     // l beyond this: O, l and P brought back by 2^-shift
  static constexpr float kRecomputeAbove = 0x1p64f;    // l beyond this (or NaN): the row is computed again
};

// x's bits as To (of x's size): memcpy, which the compiler turns into a register move on both sides.
template <typename To, typename From>
FFA_LAZY_HD inline To lazy_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "lazy_bit_cast: sizes differ");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// Whether a row sum is past what the lazy reference keeps (above kRecomputeAbove, inf, or NaN: a row
// marked before stays marked): the row is computed again exactly.
FFA_LAZY_HD inline bool lazy_lost(float l) { return !(l <= LazyRef::kRecomputeAbove); }

// The power of two 2^-shift that brings a row sum l above kRescaleAbove (and at most kRecomputeAbove) back
// to [2^-50, 2^-49): shift = e + kBias for l = 2^e * 1.f, e in [-20, 64]; 0 for any other l (NaN included).
FFA_LAZY_HD inline int lazy_shift(float l) {
  return (l > LazyRef::kRescaleAbove && l <= LazyRef::kRecomputeAbove)
             ? ((lazy_bit_cast<int32_t>(l) >> 23) - 127) + static_cast<int>(LazyRef::kBias)
             : 0;
}

// 2^-shift, exactly (a normal float for every shift lazy_shift gives: at most 64 + kBias = 114).
FFA_LAZY_HD inline float lazy_factor(int shift) { return lazy_bit_cast<float>((127 - shift) << 23); }
static_assert(64 + static_cast<int>(LazyRef::kBias) <= 126 && LazyRef::kRecomputeAbove == 0x1p64f,
              "lazy_factor: the largest shift must give a normal 2^-shift");

}  // namespace ffa

#undef FFA_LAZY_HD
