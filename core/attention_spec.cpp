#include "core/attention_spec.h"

#include <algorithm>
#include <sstream>

#include "core/errors.h"

namespace flexcp {

const char* mask_type_name(MaskType m) {
  switch (m) {
    case MaskType::Full: return "FULL";
    case MaskType::Causal: return "CAUSAL";
    case MaskType::InvCausal: return "INV_CAUSAL";
    case MaskType::BiCausal: return "BI_CAUSAL";
  }
  return "?";
}

Range slice_row_keys(const AttnSlice& s, int64_t i) {
  const int64_t lq = s.q.size(), lk = s.k.size();
  if (i < s.q.start || i >= s.q.end || lk <= 0) return {s.k.start, s.k.start};
  const int64_t a = i - s.q.start, d = lk - lq;
  int64_t lo = 0, hi = lk;  // relative key offsets b in [lo, hi)
  switch (s.mask) {
    case MaskType::Full: break;
    case MaskType::Causal: hi = std::clamp<int64_t>(a + d + 1, 0, lk); break;
    case MaskType::InvCausal: lo = std::min(a, lk); break;
    case MaskType::BiCausal:
      lo = std::min(a, lk);
      hi = std::clamp<int64_t>(a + d + 1, 0, lk);
      break;
  }
  if (hi < lo) hi = lo;
  return {s.k.start + lo, s.k.start + hi};
}

bool slice_visible(const AttnSlice& s, int64_t i, int64_t j) {
  const Range r = slice_row_keys(s, i);
  return j >= r.start && j < r.end;
}

int64_t slice_area_rows(const AttnSlice& s, int64_t row_begin, int64_t row_end) {
  row_begin = std::max(row_begin, s.q.start);
  row_end = std::min(row_end, s.q.end);
  if (row_end <= row_begin || s.k.empty()) return 0;
  if (s.mask == MaskType::Full) return (row_end - row_begin) * s.k.size();
  int64_t total = 0;
  for (int64_t i = row_begin; i < row_end; ++i) total += slice_row_keys(s, i).size();
  return total;
}

int64_t slice_area(const AttnSlice& s) { return slice_area_rows(s, s.q.start, s.q.end); }

int64_t spec_area(const AttentionSpec& spec) {
  int64_t total = 0;
  for (const auto& s : spec.slices) total += slice_area(s);
  return total;
}

static std::string slice_str(size_t idx, const AttnSlice& s) {
  std::ostringstream os;
  os << "slice " << idx << " (q [" << s.q.start << "," << s.q.end << "), k [" << s.k.start << ","
     << s.k.end << "), " << mask_type_name(s.mask) << ")";
  return os.str();
}

void spec_validate(const AttentionSpec& spec) {
  const auto& sl = spec.slices;
  for (size_t n = 0; n < sl.size(); ++n) {
    const auto& s = sl[n];
    const int m = static_cast<int>(s.mask);
    if (m < 0 || m > 3) fail("attention spec", slice_str(n, s) + " has an unknown mask type " + std::to_string(m));
    // Compared, not subtracted: a range from bad input may span more than int64 (found by fuzzing).
    if (s.q.end < s.q.start || s.k.end < s.k.start)
      fail("attention spec", slice_str(n, s) + " has a negative length", "ranges are half-open [start, end)");
    if (s.q.empty() || s.k.empty()) continue;
    if (s.q.start < 0 || s.q.end > spec.num_q)
      fail("attention spec", slice_str(n, s) + " q range outside [0," + std::to_string(spec.num_q) + ")");
    if (s.k.start < 0 || s.k.end > spec.num_k)
      fail("attention spec", slice_str(n, s) + " k range outside [0," + std::to_string(spec.num_k) + ")");
  }
  // Overlap: sweep slices sorted by q start; only pairs whose q and k ranges both intersect are
  // checked row by row (the row key intervals of the two slices must be disjoint on every shared row).
  std::vector<size_t> order(sl.size());
  for (size_t n = 0; n < order.size(); ++n) order[n] = n;
  std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return sl[x].q.start < sl[y].q.start; });
  for (size_t x = 0; x < order.size(); ++x) {
    const auto& a = sl[order[x]];
    if (a.q.empty() || a.k.empty()) continue;
    for (size_t y = x + 1; y < order.size(); ++y) {
      const auto& b = sl[order[y]];
      if (b.q.start >= a.q.end) break;
      if (b.q.empty() || b.k.empty()) continue;
      if (b.k.start >= a.k.end || a.k.start >= b.k.end) continue;
      const int64_t r0 = std::max(a.q.start, b.q.start), r1 = std::min(a.q.end, b.q.end);
      for (int64_t i = r0; i < r1; ++i) {
        const Range ra = slice_row_keys(a, i), rb = slice_row_keys(b, i);
        if (std::max(ra.start, rb.start) < std::min(ra.end, rb.end))
          fail("attention spec", slice_str(order[x], a) + " overlaps " + slice_str(order[y], b) + " at query " +
                                     std::to_string(i),
               "each (query, key) pair may be covered by one slice only");
      }
    }
  }
}

AttentionSpec spec_causal(int64_t seq_len) { return spec_causal_batch(1, seq_len); }

AttentionSpec spec_causal_batch(int64_t batch, int64_t seq_len) {
  AttentionSpec spec;
  spec.num_q = spec.num_k = batch * seq_len;
  for (int64_t b = 0; b < batch; ++b)
    spec.slices.push_back({{b * seq_len, (b + 1) * seq_len}, {b * seq_len, (b + 1) * seq_len}, MaskType::Causal});
  return spec;
}

AttentionSpec spec_documents(const std::vector<int64_t>& doc_starts, int64_t end) {
  AttentionSpec spec;
  spec.num_q = spec.num_k = end;
  for (size_t n = 0; n < doc_starts.size(); ++n) {
    const int64_t s = doc_starts[n], e = n + 1 < doc_starts.size() ? doc_starts[n + 1] : end;
    if (e > s) spec.slices.push_back({{s, e}, {s, e}, MaskType::Causal});
  }
  return spec;
}

std::string spec_to_string(const AttentionSpec& spec) {
  std::ostringstream os;
  os << "spec(q=" << spec.num_q << ", k=" << spec.num_k << ")";
  for (const auto& s : spec.slices)
    os << " [" << s.q.start << "," << s.q.end << ")x[" << s.k.start << "," << s.k.end << ")" << mask_type_name(s.mask);
  return os.str();
}

}  // namespace flexcp
