// Host-side scheduling of flexible flash attention (pure C++, no CUDA): turns a list of slices into
// the work lists the kernels walk. Tested on the CPU CI (test/ffa_plan_test.cpp).
//
// Two ideas carry the design:
//  1. Every mask type is the same shape in absolute coordinates. Key j is visible to query i inside a
//     slice iff  q_start <= i < q_end,  k_start <= j < k_end  and  i + lo <= j <= i + hi, with
//       FULL:       lo = -inf, hi = +inf
//       CAUSAL:     hi = k_end - q_end        (b <= a + Lk - Lq, bottom-right aligned)
//       INV_CAUSAL: lo = k_start - q_start    (b >= a, top-left aligned)
//       BI_CAUSAL:  both.
//     Cutting a slice to a sub-range of its rows or keys keeps lo and hi, so slices can be cut freely.
//  2. The q axis is cut at every slice q boundary into disjoint segments; each segment is tiled from
//     its own start. A work item is one q tile of one segment and walks the k tiles of every (cut)
//     slice that covers the segment, so each output row is written by exactly one item (online
//     softmax across slices, no merge). The k side (dK/dV) is planned the same way with the axes
//     swapped. Each item's k tiles are grouped into runs that are fully visible (no mask code),
//     partially visible (mask code) or skipped (never listed); items are sorted longest first (LPT).
#pragma once
#include <cstdint>
#include <vector>

namespace ffa {

// Values match flexcp::MaskType (core/attention_spec.h).
enum class Mask : int32_t { Full = 0, Causal = 1, InvCausal = 2, BiCausal = 3 };

struct Slice {
  int64_t q_start = 0, q_end = 0;  // half-open
  int64_t k_start = 0, k_end = 0;  // half-open
  Mask mask = Mask::Full;
};

// Diagonal offsets standing for "no bound". Token counts are limited to kMaxTokens so i + lo and
// i + hi never overflow int32.
constexpr int32_t kNoBound = 1 << 30;
constexpr int64_t kMaxTokens = (int64_t{1} << 30) - 1;

// A slice cut to a segment, in the absolute diagonal form above. Shared with the kernels (POD).
struct CutSlice {
  int32_t q_start, q_end, k_start, k_end, lo, hi;
};

// `tiles` consecutive tiles of the other axis starting at `begin` (tile t covers
// [begin + t * tile, begin + (t + 1) * tile)), all of cut slice `cut`; `masked` = 1 when mask code
// must run on them.
struct Run {
  int32_t begin, tiles, masked, cut;
};

// One tile of rows of the own axis: rows [row_begin, row_end) (row_end - row_begin <= tile_rows) and
// its runs [run_begin, run_end) in Side::runs. An item with no runs still owns its rows: the kernels
// write out = 0 / lse = -inf (forward) or dK = dV = 0 (backward) there.
struct Item {
  int32_t row_begin, row_end, run_begin, run_end;
};

// One side of the plan. Side "q": rows are queries, runs walk key tiles (forward, and dQ in the
// deterministic backward). Side "k": rows are keys, runs walk query tiles (dK, dV).
struct Side {
  int32_t tile_rows = 0;  // rows per item
  int32_t tile_cols = 0;  // tile size of the other axis in the runs
  std::vector<Item> items;
  std::vector<Run> runs;
  std::vector<CutSlice> cuts;
  int64_t full_tiles = 0, masked_tiles = 0;
};

struct PlanConfig {
  int32_t fwd_tile_q = 128, fwd_tile_k = 128;  // q side
  int32_t bwd_tile_k = 128, bwd_tile_q = 64;  // k side
};

struct Plan {
  int64_t num_q = 0, num_k = 0;
  Side q_side, k_side;
  int64_t visible_pairs = 0;  // sum of slice areas (FLOP counting)
};

// Validates (bounds, lengths, mask values, size limits; throws flexcp::UserError naming the slice)
// and builds both sides. Overlap between slices is NOT checked here (flexcp::spec_validate does it);
// overlapping slices would count a pair twice.
Plan plan_build(const std::vector<Slice>& slices, int64_t num_q, int64_t num_k, const PlanConfig& cfg = {});

// Visible (i, j) pairs of one slice (closed form per row; exact).
int64_t slice_visible_pairs(const Slice& s);

// Cut form of a whole slice (lo/hi from its mask type).
CutSlice slice_cut(const Slice& s);

// The plan as one int32 array the kernels read after the caller copies it to the device, and where
// each part starts in it (in int32 units).
struct PlanLayout {
  int32_t num_q = 0, num_k = 0;
  int32_t q_items = 0, q_runs = 0, q_cuts = 0, q_num_items = 0, q_tile_rows = 0, q_tile_cols = 0;
  int32_t k_items = 0, k_runs = 0, k_cuts = 0, k_num_items = 0, k_tile_rows = 0, k_tile_cols = 0;
  int32_t total = 0;
};
std::vector<int32_t> plan_serialize(const Plan& plan, PlanLayout* layout);

}  // namespace ffa
