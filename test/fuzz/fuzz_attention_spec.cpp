// libFuzzer target: spec_validate, the attention spec checker (docs/attention-spec.md).
// Byte 0 picks the mode:
//  - even: a small spec (num_q, num_k < 64; ranges from bytes, possibly out of bounds or reversed,
//    mask types 0..4) checked against brute force over the (i, j) grid: spec_validate accepts it
//    exactly when every slice has a known mask, no negative length, non-empty slices lie in bounds
//    and no (i, j) pair is visible in two slices; the area functions equal the brute-force counts.
//  - odd: raw 64-bit starts and ends (num_q, num_k < 4096) to look for overflow; only "no crash and
//    no sanitizer report" is checked.
#include <cstring>
#include <vector>

#include "core/attention_spec.h"
#include "core/errors.h"

using namespace flexcp;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n;
  uint8_t byte() { return n ? (--n, *p++) : 0; }
  int64_t i64() {
    int64_t v = 0;
    const size_t k = n < 8 ? n : 8;
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
};

bool brute_force_valid(const AttentionSpec& spec) {
  for (const auto& s : spec.slices) {
    const int m = static_cast<int>(s.mask);
    if (m < 0 || m > 3) return false;
    if (s.q.end < s.q.start || s.k.end < s.k.start) return false;
    if (s.q.empty() || s.k.empty()) continue;
    if (s.q.start < 0 || s.q.end > spec.num_q || s.k.start < 0 || s.k.end > spec.num_k) return false;
  }
  std::vector<int> cover(static_cast<size_t>(spec.num_q * spec.num_k), 0);
  for (const auto& s : spec.slices) {
    if (s.q.empty() || s.k.empty()) continue;
    for (int64_t i = s.q.start; i < s.q.end; ++i)
      for (int64_t j = s.k.start; j < s.k.end; ++j)
        if (slice_visible(s, i, j) && ++cover[static_cast<size_t>(i * spec.num_k + j)] > 1) return false;
  }
  return true;
}

int64_t brute_force_area(const AttnSlice& s) {
  int64_t n = 0;
  for (int64_t i = s.q.start; i < s.q.end; ++i)
    for (int64_t j = s.k.start; j < s.k.end; ++j) n += slice_visible(s, i, j);
  return n;
}

// Independent definition of visibility (docs/attention-spec.md): with a = i - q.start,
// b = j - k.start, d = |k| - |q|: FULL all, CAUSAL b <= a + d, INV_CAUSAL b >= a, BI_CAUSAL both.
bool visible_by_definition(const AttnSlice& s, int64_t i, int64_t j) {
  if (i < s.q.start || i >= s.q.end || j < s.k.start || j >= s.k.end) return false;
  const int64_t a = i - s.q.start, b = j - s.k.start, d = s.k.size() - s.q.size();
  switch (s.mask) {
    case MaskType::Full: return true;
    case MaskType::Causal: return b <= a + d;
    case MaskType::InvCausal: return b >= a;
    case MaskType::BiCausal: return b <= a + d && b >= a;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  const bool raw = r.byte() & 1;
  AttentionSpec spec;
  if (!raw) {
    spec.num_q = r.byte() % 64;
    spec.num_k = r.byte() % 64;
    while (r.n >= 5 && spec.slices.size() < 16) {
      AttnSlice s;
      s.q.start = static_cast<int8_t>(r.byte());
      s.q.end = static_cast<int8_t>(r.byte());
      s.k.start = static_cast<int8_t>(r.byte());
      s.k.end = static_cast<int8_t>(r.byte());
      s.mask = static_cast<MaskType>(r.byte() % 5);
      spec.slices.push_back(s);
    }
    bool ok = true;
    try {
      spec_validate(spec);
    } catch (const UserError&) {
      ok = false;
    }
    if (ok != brute_force_valid(spec)) std::abort();
    if (ok) {
      int64_t total = 0;
      for (const auto& s : spec.slices) {
        if (s.q.empty() || s.k.empty()) continue;
        const int64_t area = brute_force_area(s);
        if (slice_area(s) != area) std::abort();
        total += area;
        for (int64_t i = s.q.start; i < s.q.end; ++i)
          for (int64_t j = s.k.start; j < s.k.end; ++j)
            if (slice_visible(s, i, j) != visible_by_definition(s, i, j)) std::abort();
      }
      if (spec_area(spec) != total) std::abort();
    }
  } else {
    spec.num_q = static_cast<int64_t>(r.i64() & 4095);
    spec.num_k = static_cast<int64_t>(r.i64() & 4095);
    while (r.n >= 33 && spec.slices.size() < 8) {
      AttnSlice s;
      s.q.start = r.i64();
      s.q.end = r.i64();
      s.k.start = r.i64();
      s.k.end = r.i64();
      s.mask = static_cast<MaskType>(r.byte() % 5);
      spec.slices.push_back(s);
    }
    try {
      spec_validate(spec);
      (void)spec_area(spec);
      (void)spec_to_string(spec);
    } catch (const UserError&) {
    }
  }
  return 0;
}
