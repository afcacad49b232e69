// The lazy reference's rule for a row's sum (cuda/ffa_lazy_ref.h, the functions forward kernels 3/5 call):
// every sum it takes on comes back to [2^-50, 2^-49) by an exact power of two, and every other sum
// (small, past the recompute bound, inf, NaN) is left alone.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

#include "cuda/ffa_lazy_ref.h"

TEST_CASE("lazy reference: sums past the rescale bound come back between 2^-50 and 2^-49 exactly", "[ffa][lazy]") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mantissa(1.f, 2.f);
  int checked = 0;
  for (int e = -20; e <= 63; ++e) {
    for (int i = 0; i < 200; ++i) {
      const float l = std::ldexp(mantissa(rng), e);
      if (!(l > ffa::LazyRef::kRescaleAbove)) continue;  // 2^-20 itself stays
      CAPTURE(l, e);
      const int shift = ffa::lazy_shift(l);
      REQUIRE(shift == e + 50);
      const float f = ffa::lazy_factor(shift);
      REQUIRE(std::isnormal(f));
      REQUIRE(f == std::ldexp(1.0, -shift));  // a power of two, exactly
      const float back = l * f;              // as the kernel scales O, l and P
      REQUIRE(back == static_cast<float>(std::ldexp(static_cast<double>(l), -shift)));  // no rounding
      REQUIRE(back >= 0x1p-50f);
      REQUIRE(back < 0x1p-49f);
      ++checked;
    }
  }
  // The largest sum the rule takes (2^64, the recompute bound itself): the largest shift, still a normal 2^-shift.
  const int top = ffa::lazy_shift(ffa::LazyRef::kRecomputeAbove);
  REQUIRE(top == 114);
  REQUIRE(ffa::LazyRef::kRecomputeAbove * ffa::lazy_factor(top) == 0x1p-50f);
  REQUIRE(checked > 15000);
}

TEST_CASE("lazy reference: other sums are left alone", "[ffa][lazy]") {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float l : {0.f, 0x1p-126f, 0x1p-50f, 0x1.fffffep-21f, ffa::LazyRef::kRescaleAbove,
                        std::nextafter(ffa::LazyRef::kRecomputeAbove, inf), 0x1p100f, inf,
                        std::numeric_limits<float>::quiet_NaN()}) {
    CAPTURE(l);
    REQUIRE(ffa::lazy_shift(l) == 0);
  }
  // Lost (computed again exactly): past the recompute bound, inf and NaN; the bound itself is kept.
  REQUIRE_FALSE(ffa::lazy_lost(ffa::LazyRef::kRecomputeAbove));
  REQUIRE_FALSE(ffa::lazy_lost(0.f));
  REQUIRE(ffa::lazy_lost(std::nextafter(ffa::LazyRef::kRecomputeAbove, inf)));
  REQUIRE(ffa::lazy_lost(inf));
  REQUIRE(ffa::lazy_lost(std::numeric_limits<float>::quiet_NaN()));
  REQUIRE(ffa::lazy_factor(0) == 1.f);  // a row left alone is multiplied by 1
  // The factor for every shift the rule can give is an exact, normal power of two.
  for (int s = 0; s <= 114; ++s) {
    CAPTURE(s);
    REQUIRE(std::isnormal(ffa::lazy_factor(s)));
    REQUIRE(ffa::lazy_factor(s) == std::ldexp(1.0, -s));
  }
}
