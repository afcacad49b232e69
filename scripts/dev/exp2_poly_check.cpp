// CPU check of forward kernel 4's polynomial exp2 (exp2_poly in cuda/ffa_fwd_overlap.cu): the same
// float32 operations in the same order with the same constants (cuda/ffa_exp2_poly.h), over every
// float32 x in [-127, 8] (the softmax's x = s * scale - max is at most 8 = kStaleMaxLog2), against
// exp2 in float64. Prints the max relative error where 2^x is a normal float (x >= -126), the max
// absolute error below, the special inputs, and what the error does after P is rounded to bf16 / fp16
// (as pack2 does): how often the rounded value differs from the rounded correctly-rounded 2^x, and by
// how many ulps. Exit code 1 if a bound in the kernel's comments does not hold. CTest runs it with
// stride 97 (test/CMakeLists.txt, test `exp2_poly_check`).
//
//   g++ -std=c++17 -O2 -frounding-math -ffp-contract=off -I. scripts/dev/exp2_poly_check.cpp -o /tmp/exp2_poly_check
//   /tmp/exp2_poly_check [stride]   (stride: test every stride-th float32 bit pattern; default 1, ~2 minutes)
//
// The device rounding modes: __fadd_rd (FADD.RM) is run under FE_DOWNWARD, everything else under
// FE_TONEAREST; std::fma is the fused multiply-add (FFMA rounds once, as fma does). Non-ftz, as the
// kernel is compiled (no --use_fast_math).
#include <cfenv>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/ffa_exp2_poly.h"

namespace {

using namespace ffa::exp2_poly_constants;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp2_poly for a batch: j = RD(max(x, -127) + kRound) for all, then the rest in round-to-nearest.
void exp2_poly_batch(const std::vector<float>& x, std::vector<float>& y) {
  const size_t n = x.size();
  std::vector<float> xc(n), j(n);
  for (size_t i = 0; i < n; ++i) xc[i] = std::fmax(x[i], kMin);  // FMNMX: NaN -> -127, as on the GPU
  std::fesetround(FE_DOWNWARD);
  for (size_t i = 0; i < n; ++i) {
    volatile float a = xc[i];
    j[i] = a + kRound;
  }
  std::fesetround(FE_TONEAREST);
  y.resize(n);
  for (size_t i = 0; i < n; ++i) {
    volatile float jm = j[i] - kRound;
    const float f = xc[i] - jm;
    const float p = std::fma(std::fma(std::fma(kC3, f, kC2), f, kC1), f, 1.f);
    y[i] = from_bits(bits(p) + (bits(j[i]) << 23));
  }
}

float exp2_poly(float x) {
  std::vector<float> in{x}, out;
  exp2_poly_batch(in, out);
  return out[0];
}

// Round a float to bf16 / fp16 (round to nearest even), returned as a double; and the ulp there.
double round_bf16(float f) {
  uint32_t u = bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return from_bits(u & 0xFFFF0000u);
}
double ulp_bf16(double v) { return std::ldexp(1.0, std::ilogb(v) - 7); }
double round_fp16(float f) {  // normal range only (the check stays in it)
  const int e = std::ilogb(f);
  const double q = std::ldexp(1.0, e - 10);
  return std::nearbyint(f / q) * q;  // nearbyint in FE_TONEAREST: ties to even
}
double ulp_fp16(double v) { return std::ldexp(1.0, std::ilogb(v) - 10); }

struct Stats {
  double max_rel = 0, at = 0;
  double max_abs_low = 0, at_low = 0;
  uint64_t count = 0, normal_count = 0, bf16_diff = 0, fp16_count = 0, fp16_diff = 0;
  double bf16_max_ulps = 0, fp16_max_ulps = 0;
};

void account(Stats& s, float x, float y) {
  const double ref = std::exp2(static_cast<double>(x));
  ++s.count;
  if (x >= -126.f) {
    ++s.normal_count;
    const double rel = std::fabs(y / ref - 1.0);
    if (rel > s.max_rel) s.max_rel = rel, s.at = x;
    const float ref32 = static_cast<float>(ref);  // what an exact exp2 would give the kernel
    const double b = round_bf16(y), rb = round_bf16(ref32);
    if (b != rb) {
      ++s.bf16_diff;
      const double u = std::fabs(b - rb) / ulp_bf16(rb);
      if (u > s.bf16_max_ulps) s.bf16_max_ulps = u;
    }
    if (x >= -14.f) {  // fp16 normal range (P <= 2^8 is far from fp16's max)
      ++s.fp16_count;
      const double h = round_fp16(y), rh = round_fp16(ref32);
      if (h != rh) {
        ++s.fp16_diff;
        const double u = std::fabs(h - rh) / ulp_fp16(rh);
        if (u > s.fp16_max_ulps) s.fp16_max_ulps = u;
      }
    }
  } else {
    const double abs_err = std::fabs(y - ref);
    if (abs_err > s.max_abs_low) s.max_abs_low = abs_err, s.at_low = x;
  }
}

// Every stride-th bit pattern from lo to hi (inclusive), in batches.
void sweep(Stats& s, uint32_t lo, uint32_t hi, uint32_t stride) {
  std::vector<float> xs, ys;
  xs.reserve(1 << 16);
  for (uint64_t u = lo; u <= hi; u += stride) {
    xs.push_back(from_bits(static_cast<uint32_t>(u)));
    if (xs.size() == xs.capacity() || u + stride > hi) {
      exp2_poly_batch(xs, ys);
      for (size_t i = 0; i < xs.size(); ++i) account(s, xs[i], ys[i]);
      xs.clear();
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint32_t stride = argc > 1 ? static_cast<uint32_t>(std::strtoul(argv[1], nullptr, 10)) : 1u;
  Stats s;
  sweep(s, 0x00000000u, bits(8.f), stride);     // +0 .. 8
  sweep(s, 0x80000000u, bits(-127.f), stride);  // -0 .. -127 (bit patterns grow with |x|)
  int bad = 0;
  std::printf("exp2_poly over %" PRIu64 " float32 values in [-127, 8] (stride %u)\n", s.count, stride);
  std::printf("  max relative error, x in [-126, 8]: %.3e at x = %.9g\n", s.max_rel, s.at);
  std::printf("  max absolute error, x in [-127, -126): %.3e (2^-126 = %.3e) at x = %.9g\n", s.max_abs_low,
              std::ldexp(1.0, -126), s.at_low);
  std::printf("  after bf16 rounding: differs from bf16(2^x) by at most %.0f ulp\n", s.bf16_max_ulps);
  std::printf("  after fp16 rounding (x >= -14): differs from fp16(2^x) by at most %.0f ulp\n", s.fp16_max_ulps);
  // How often: the bit patterns above crowd near x = 0 (2^x ~ 1), so count on a uniform grid of x
  // instead, whose P mantissas are spread evenly (as the softmax's are).
  Stats g;
  std::vector<float> xs, ys;
  const int kGrid = 1 << 24;
  for (int k = 0; k <= kGrid; ++k) xs.push_back(-16.f + 24.f * static_cast<float>(k) / kGrid);
  exp2_poly_batch(xs, ys);
  for (size_t i = 0; i < xs.size(); ++i) account(g, xs[i], ys[i]);
  std::printf("  uniform grid of %d x in [-16, 8]: bf16(P) differs from bf16(2^x) for %.2f%%, fp16 for %.2f%%"
              " (max relative error there %.3e)\n",
              kGrid + 1, 100.0 * g.bf16_diff / g.normal_count, 100.0 * g.fp16_diff / g.fp16_count, g.max_rel);
  bad += s.max_rel > 1e-4;  // the kernel's comment says 8.6e-5 (minimax) plus float32 rounding
  bad += s.max_abs_low > std::ldexp(1.0, -126);
  bad += s.bf16_max_ulps > 1 || s.fp16_max_ulps > 1;
  // Special inputs: -inf (a masked score) must give +0 exactly, integers exact powers of two.
  const float neg_inf = exp2_poly(-INFINITY), nan_out = exp2_poly(NAN);
  std::printf("  exp2_poly(-inf) = %g (bits 0x%08x), exp2_poly(nan) = %g\n", neg_inf, bits(neg_inf), nan_out);
  bad += bits(neg_inf) != 0u;
  int inexact_int = 0;
  for (int n = -126; n <= 8; ++n) inexact_int += exp2_poly(static_cast<float>(n)) != std::ldexp(1.f, n);
  std::printf("  integers -126..8 exact: %s\n", inexact_int == 0 ? "yes" : "NO");
  bad += inexact_int != 0;
  std::printf("%s\n", bad ? "FAIL" : "ok");
  return bad ? 1 : 0;
}
