#include "cuda/ffa_plan.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "core/errors.h"

namespace ffa {
namespace {

const char* mask_name(Mask m) {
  switch (m) {
    case Mask::Full: return "FULL";
    case Mask::Causal: return "CAUSAL";
    case Mask::InvCausal: return "INV_CAUSAL";
    case Mask::BiCausal: return "BI_CAUSAL";
  }
  return "?";
}

std::string slice_str(size_t n, const Slice& s) {
  return "slice " + std::to_string(n) + " (q [" + std::to_string(s.q_start) + "," + std::to_string(s.q_end) +
         "), k [" + std::to_string(s.k_start) + "," + std::to_string(s.k_end) + "), " + mask_name(s.mask) + ")";
}

// A cut slice seen from one side: `own` is the axis the items tile, `other` the axis the runs walk.
// Visible: own in [os, oe), other in [xs, xe), own + dlo <= other <= own + dhi.
struct Oriented {
  int64_t os, oe, xs, xe, dlo, dhi;
  CutSlice cut;  // in q/k orientation, own range not yet clamped to a segment
};

Side build_side(const std::vector<Oriented>& parts, int64_t n_own, int32_t tile_rows, int32_t tile_cols,
                bool rows_must_be_complete, bool own_is_q) {
  Side side;
  side.tile_rows = tile_rows;
  side.tile_cols = tile_cols;
  std::vector<int64_t> bounds = {0, n_own};
  for (const auto& p : parts) {
    bounds.push_back(p.os);
    bounds.push_back(p.oe);
  }
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());

  struct Costed {
    Item item;
    double cost;
  };
  std::vector<Costed> items;
  std::vector<size_t> covering;
  for (size_t b = 0; b + 1 < bounds.size(); ++b) {
    const int64_t b0 = bounds[b], b1 = bounds[b + 1];
    if (b1 <= b0) continue;
    covering.clear();
    for (size_t n = 0; n < parts.size(); ++n)
      if (parts[n].os <= b0 && parts[n].oe >= b1) covering.push_back(n);
    // One cut per covering slice, own range clamped to the segment.
    const int32_t cut_base = static_cast<int32_t>(side.cuts.size());
    for (size_t n : covering) {
      CutSlice c = parts[n].cut;
      if (own_is_q) {
        c.q_start = static_cast<int32_t>(b0);
        c.q_end = static_cast<int32_t>(b1);
      } else {
        c.k_start = static_cast<int32_t>(b0);
        c.k_end = static_cast<int32_t>(b1);
      }
      side.cuts.push_back(c);
    }
    for (int64_t r0 = b0; r0 < b1; r0 += tile_rows) {
      const int64_t r1 = std::min<int64_t>(r0 + tile_rows, b1);
      Item it{static_cast<int32_t>(r0), static_cast<int32_t>(r1), static_cast<int32_t>(side.runs.size()), 0};
      double cost = 0.05;  // an item costs something even with no tiles (its epilogue)
      for (size_t c = 0; c < covering.size(); ++c) {
        const Oriented& p = parts[covering[c]];
        // Other-axis interval any row of this tile can see.
        const int64_t xmin = std::max(p.xs, r0 + p.dlo);
        const int64_t xmax = std::min(p.xe, (r1 - 1) + p.dhi + 1);
        if (xmin >= xmax) continue;  // no visible pair: skipped
        const int64_t ntiles = (xmax - xmin + tile_cols - 1) / tile_cols;
        const bool rows_ok = !rows_must_be_complete || r1 - r0 == tile_rows;
        int32_t cur_masked = -1;
        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t c0 = xmin + t * tile_cols, c_last = c0 + tile_cols - 1;
          const bool full = rows_ok && c_last < p.xe && c0 >= (r1 - 1) + p.dlo && c_last <= r0 + p.dhi;
          const int32_t masked = full ? 0 : 1;
          if (masked != cur_masked) {
            side.runs.push_back(Run{static_cast<int32_t>(c0), 0, masked, cut_base + static_cast<int32_t>(c)});
            cur_masked = masked;
          }
          side.runs.back().tiles++;
          if (full) {
            side.full_tiles++;
            cost += 1.0;
          } else {
            side.masked_tiles++;
            cost += 1.3;
          }
        }
      }
      it.run_end = static_cast<int32_t>(side.runs.size());
      items.push_back({it, cost});
    }
  }
  // Longest first, so the tail of the grid is made of short items (LPT).
  std::stable_sort(items.begin(), items.end(), [](const Costed& a, const Costed& b) { return a.cost > b.cost; });
  side.items.reserve(items.size());
  for (const auto& c : items) side.items.push_back(c.item);
  return side;
}

}  // namespace

CutSlice slice_cut(const Slice& s) {
  CutSlice c{static_cast<int32_t>(s.q_start), static_cast<int32_t>(s.q_end), static_cast<int32_t>(s.k_start),
             static_cast<int32_t>(s.k_end), -kNoBound, kNoBound};
  if (s.mask == Mask::Causal || s.mask == Mask::BiCausal) c.hi = static_cast<int32_t>(s.k_end - s.q_end);
  if (s.mask == Mask::InvCausal || s.mask == Mask::BiCausal) c.lo = static_cast<int32_t>(s.k_start - s.q_start);
  return c;
}

int64_t slice_visible_pairs(const Slice& s) {
  if (s.q_end <= s.q_start || s.k_end <= s.k_start) return 0;
  const CutSlice c = slice_cut(s);
  int64_t total = 0;
  for (int64_t i = s.q_start; i < s.q_end; ++i) {
    const int64_t lo = std::max<int64_t>(s.k_start, i + c.lo), hi = std::min<int64_t>(s.k_end, i + c.hi + 1);
    if (hi > lo) total += hi - lo;
  }
  return total;
}

Plan plan_build(const std::vector<Slice>& slices, int64_t num_q, int64_t num_k, const PlanConfig& cfg) {
  using flexcp::fail;
  const char* where = "ffa plan";
  if (num_q < 0 || num_k < 0 || num_q > kMaxTokens || num_k > kMaxTokens)
    fail(where, "num_q=" + std::to_string(num_q) + ", num_k=" + std::to_string(num_k) + " out of range",
         "token counts must lie in [0, 2^30)");
  if (cfg.fwd_tile_q <= 0 || cfg.fwd_tile_k <= 0 || cfg.bwd_tile_q <= 0 || cfg.bwd_tile_k <= 0)
    fail(where, "tile sizes must be positive");
  Plan plan;
  plan.num_q = num_q;
  plan.num_k = num_k;
  std::vector<Oriented> q_parts, k_parts;
  for (size_t n = 0; n < slices.size(); ++n) {
    const Slice& s = slices[n];
    const int m = static_cast<int>(s.mask);
    if (m < 0 || m > 3) fail(where, slice_str(n, s) + " has an unknown mask type " + std::to_string(m), "use 0..3");
    if (s.q_end < s.q_start || s.k_end < s.k_start)
      fail(where, slice_str(n, s) + " has a negative length", "ranges are half-open [start, end)");
    if (s.q_end == s.q_start || s.k_end == s.k_start) continue;  // empty: does nothing
    if (s.q_start < 0 || s.q_end > num_q)
      fail(where, slice_str(n, s) + " q range outside [0," + std::to_string(num_q) + ")", "clip the slice");
    if (s.k_start < 0 || s.k_end > num_k)
      fail(where, slice_str(n, s) + " k range outside [0," + std::to_string(num_k) + ")", "clip the slice");
    const CutSlice c = slice_cut(s);
    plan.visible_pairs += slice_visible_pairs(s);
    q_parts.push_back({s.q_start, s.q_end, s.k_start, s.k_end, c.lo, c.hi, c});
    // Seen from the keys: i + lo <= j <= i + hi  <=>  j - hi <= i <= j - lo.
    k_parts.push_back({s.k_start, s.k_end, s.q_start, s.q_end, -int64_t{c.hi}, -int64_t{c.lo}, c});
  }
  plan.q_side = build_side(q_parts, num_q, cfg.fwd_tile_q, cfg.fwd_tile_k, false, true);
  // Keys beyond a partial k tile belong to another segment: the dQ of that tile must mask them, so
  // only complete k tiles may run unmasked.
  plan.k_side = build_side(k_parts, num_k, cfg.bwd_tile_k, cfg.bwd_tile_q, true, false);
  return plan;
}

std::vector<int32_t> plan_serialize(const Plan& plan, PlanLayout* layout) {
  static_assert(sizeof(Item) == 16 && sizeof(Run) == 16 && sizeof(CutSlice) == 24, "POD layout");
  std::vector<int32_t> out;
  PlanLayout L;
  L.num_q = static_cast<int32_t>(plan.num_q);
  L.num_k = static_cast<int32_t>(plan.num_k);
  auto append = [&](const void* p, size_t bytes) {
    const int32_t off = static_cast<int32_t>(out.size());
    const int32_t* w = static_cast<const int32_t*>(p);
    out.insert(out.end(), w, w + bytes / 4);
    return off;
  };
  const Side& q = plan.q_side;
  const Side& k = plan.k_side;
  L.q_items = append(q.items.data(), q.items.size() * sizeof(Item));
  L.q_runs = append(q.runs.data(), q.runs.size() * sizeof(Run));
  L.q_cuts = append(q.cuts.data(), q.cuts.size() * sizeof(CutSlice));
  L.q_num_items = static_cast<int32_t>(q.items.size());
  L.q_tile_rows = q.tile_rows;
  L.q_tile_cols = q.tile_cols;
  L.k_items = append(k.items.data(), k.items.size() * sizeof(Item));
  L.k_runs = append(k.runs.data(), k.runs.size() * sizeof(Run));
  L.k_cuts = append(k.cuts.data(), k.cuts.size() * sizeof(CutSlice));
  L.k_num_items = static_cast<int32_t>(k.items.size());
  L.k_tile_rows = k.tile_rows;
  L.k_tile_cols = k.tile_cols;
  if (out.empty()) out.push_back(0);  // never a zero-sized device buffer
  L.total = static_cast<int32_t>(out.size());
  if (layout) *layout = L;
  return out;
}

}  // namespace ffa
