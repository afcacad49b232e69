// Host-side scheduling of the attention kernels (cuda/ffa_plan.h), checked against a brute-force
// visibility mask built from the spec doc's table: every visible (query, key) pair is covered by
// exactly one listed tile on each side, unmasked tiles contain only visible pairs, rows belong to
// exactly one item, items come longest first, and bad slices are refused.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "core/errors.h"
#include "cuda/ffa_plan.h"

namespace {

using ffa::Mask;
using ffa::Slice;

// Visibility straight from docs/attention-spec.md (relative a, b, d), independent of the planner's
// diagonal form.
bool spec_visible(const Slice& s, int64_t i, int64_t j) {
  if (i < s.q_start || i >= s.q_end || j < s.k_start || j >= s.k_end) return false;
  const int64_t a = i - s.q_start, b = j - s.k_start, d = (s.k_end - s.k_start) - (s.q_end - s.q_start);
  switch (s.mask) {
    case Mask::Full: return true;
    case Mask::Causal: return b <= a + d;
    case Mask::InvCausal: return b >= a;
    case Mask::BiCausal: return b >= a && b <= a + d;
  }
  return false;
}

bool cut_visible(const ffa::CutSlice& c, int64_t i, int64_t j) {
  return i >= c.q_start && i < c.q_end && j >= c.k_start && j < c.k_end && j >= i + c.lo && j <= i + c.hi;
}

std::vector<Slice> random_spec(std::mt19937& rng, int64_t tq, int64_t tk) {
  auto partition = [&](int64_t n, int parts) {
    std::vector<int64_t> b = {0, n};
    std::uniform_int_distribution<int64_t> pick(1, std::max<int64_t>(1, n - 1));
    for (int p = 1; p < parts && n > 1; ++p) b.push_back(pick(rng));
    std::sort(b.begin(), b.end());
    b.erase(std::unique(b.begin(), b.end()), b.end());
    return b;
  };
  std::vector<Slice> out;
  const auto kb = partition(tk, 1 + rng() % 4);
  for (size_t x = 0; x + 1 < kb.size(); ++x) {
    const auto qb = partition(tq, 1 + rng() % 4);
    for (size_t y = 0; y + 1 < qb.size(); ++y)
      if (rng() % 4 != 0) out.push_back({qb[y], qb[y + 1], kb[x], kb[x + 1], static_cast<Mask>(rng() % 4)});
  }
  out.push_back({3, 3, 0, tk, Mask::Full});  // empty: does nothing
  return out;
}

// Checks one side. own_is_q: items own query rows and runs walk keys.
void check_side(const ffa::Side& side, const std::vector<Slice>& spec, int64_t tq, int64_t tk, bool own_is_q,
                bool rows_complete_for_full) {
  const int64_t n_own = own_is_q ? tq : tk, n_other = own_is_q ? tk : tq;
  std::vector<int> owner(n_own, 0), cover(static_cast<size_t>(tq * tk), 0);
  double last_cost = 1e300;
  for (const auto& it : side.items) {
    REQUIRE(it.row_begin < it.row_end);
    REQUIRE(it.row_end - it.row_begin <= side.tile_rows);
    for (int64_t r = it.row_begin; r < it.row_end; ++r) owner[r]++;
    double cost = 0.05;
    for (int32_t ri = it.run_begin; ri < it.run_end; ++ri) {
      const ffa::Run& run = side.runs[ri];
      REQUIRE(run.tiles > 0);
      const ffa::CutSlice& cut = side.cuts[run.cut];
      cost += run.tiles * (run.masked ? 1.3 : 1.0);
      for (int t = 0; t < run.tiles; ++t) {
        const int64_t c0 = run.begin + int64_t{t} * side.tile_cols;
        int64_t visible_in_tile = 0;
        const bool complete = it.row_end - it.row_begin == side.tile_rows;
        for (int64_t r = it.row_begin; r < it.row_end; ++r)
          for (int64_t c = c0; c < c0 + side.tile_cols; ++c) {
            const int64_t i = own_is_q ? r : c, j = own_is_q ? c : r;
            const bool vis = c < n_other && cut_visible(cut, i, j);
            if (!run.masked) {
              INFO("unmasked tile with an invisible pair at (" << i << ", " << j << ")");
              REQUIRE(vis);
            }
            if (vis) {
              cover[static_cast<size_t>(i * tk + j)]++;
              visible_in_tile++;
            }
          }
        if (!run.masked && rows_complete_for_full) REQUIRE(complete);
        (void)visible_in_tile;
      }
    }
    REQUIRE(cost <= last_cost + 1e-9);  // longest first
    last_cost = cost;
  }
  for (int64_t r = 0; r < n_own; ++r) {
    INFO("row " << r << " of the " << (own_is_q ? "q" : "k") << " side");
    REQUIRE(owner[r] == 1);
  }
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t j = 0; j < tk; ++j) {
      int expect = 0;
      for (const auto& s : spec) expect += spec_visible(s, i, j);
      INFO("pair (" << i << ", " << j << ") on the " << (own_is_q ? "q" : "k") << " side");
      REQUIRE(cover[static_cast<size_t>(i * tk + j)] == expect);
    }
}

int64_t brute_pairs(const std::vector<Slice>& spec, int64_t tq, int64_t tk) {
  int64_t n = 0;
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t j = 0; j < tk; ++j)
      for (const auto& s : spec) n += spec_visible(s, i, j);
  return n;
}

}  // namespace

TEST_CASE("ffa plan covers every visible pair exactly once, random slice sets", "[ffa][plan]") {
  std::mt19937 rng(7);
  const ffa::PlanConfig small{16, 8, 8, 16};
  for (int n = 0; n < 60; ++n) {
    const int64_t tq = 1 + rng() % 120, tk = 1 + rng() % 120;
    const auto spec = random_spec(rng, tq, tk);
    const ffa::PlanConfig cfg = n % 2 ? small : ffa::PlanConfig{};
    const ffa::Plan plan = ffa::plan_build(spec, tq, tk, cfg);
    CHECK(plan.visible_pairs == brute_pairs(spec, tq, tk));
    check_side(plan.q_side, spec, tq, tk, true, false);
    check_side(plan.k_side, spec, tq, tk, false, true);
  }
}

TEST_CASE("ffa plan: every mask type with Lq != Lk and documents", "[ffa][plan]") {
  const ffa::PlanConfig small{16, 8, 8, 16};
  for (int m = 0; m < 4; ++m)
    for (auto [lq, lk] : {std::pair<int64_t, int64_t>{37, 90}, {90, 37}, {64, 64}}) {
      const std::vector<Slice> spec = {{0, lq, 0, lk, static_cast<Mask>(m)}};
      const ffa::Plan plan = ffa::plan_build(spec, lq, lk, small);
      CHECK(plan.visible_pairs == brute_pairs(spec, lq, lk));
      check_side(plan.q_side, spec, lq, lk, true, false);
      check_side(plan.k_side, spec, lq, lk, false, true);
    }
  std::vector<Slice> docs;
  for (int64_t s : {0, 5, 6, 40, 41, 100}) docs.push_back({s, 0, s, 0, Mask::Causal});
  for (size_t n = 0; n < docs.size(); ++n) docs[n].q_end = docs[n].k_end = n + 1 < docs.size() ? docs[n + 1].q_start : 130;
  const ffa::Plan plan = ffa::plan_build(docs, 130, 130, small);
  check_side(plan.q_side, docs, 130, 130, true, false);
  check_side(plan.k_side, docs, 130, 130, false, true);
}

TEST_CASE("ffa plan: causal 8192 runs mask code only on diagonal tiles", "[ffa][plan]") {
  const std::vector<Slice> spec = {{0, 8192, 0, 8192, Mask::Causal}};
  const ffa::Plan plan = ffa::plan_build(spec, 8192, 8192);
  CHECK(plan.visible_pairs == int64_t{8192} * 8193 / 2);
  CHECK(plan.q_side.items.size() == 64);
  // Each 128-row q tile has one masked 128-key tile on the diagonal; the rest are full.
  CHECK(plan.q_side.masked_tiles == 64);
  CHECK(plan.q_side.full_tiles == 64 * 63 / 2);  // sum over q tiles t of t full tiles
  CHECK(plan.k_side.items.size() == 64);
  CHECK(plan.k_side.masked_tiles == 128);  // two 128x64 tiles per 128-key item meet the diagonal
  // LPT: the first item is the last q tile (the longest row of tiles).
  CHECK(plan.q_side.items.front().row_begin == 8192 - 128);
  CHECK(plan.q_side.items.back().row_begin == 0);
}

TEST_CASE("ffa plan: rows no slice covers still get an item; serialization layout", "[ffa][plan]") {
  const std::vector<Slice> spec = {{10, 20, 0, 5, Mask::Full}};
  const ffa::Plan plan = ffa::plan_build(spec, 300, 50);
  int64_t rows = 0;
  for (const auto& it : plan.q_side.items) rows += it.row_end - it.row_begin;
  CHECK(rows == 300);
  ffa::PlanLayout L;
  const auto blob = ffa::plan_serialize(plan, &L);
  CHECK(L.total == static_cast<int32_t>(blob.size()));
  CHECK(L.q_num_items == static_cast<int32_t>(plan.q_side.items.size()));
  CHECK(L.num_q == 300);
  CHECK(L.num_k == 50);
  const auto* first = reinterpret_cast<const ffa::Item*>(blob.data() + L.q_items);
  CHECK(first->row_begin == plan.q_side.items[0].row_begin);
  const auto* cut = reinterpret_cast<const ffa::CutSlice*>(blob.data() + L.k_cuts);
  CHECK(cut->q_start == 10);
  // No slices at all: every row still owned, nothing to compute.
  const ffa::Plan empty = ffa::plan_build({}, 100, 0);
  CHECK(empty.q_side.items.size() == 1);
  CHECK(empty.q_side.runs.empty());
}

TEST_CASE("ffa plan refuses bad slices with a message naming the slice", "[ffa][plan]") {
  CHECK_THROWS_AS(ffa::plan_build({{0, 10, 0, 20, Mask::Causal}}, 5, 20), flexcp::UserError);
  CHECK_THROWS_WITH(ffa::plan_build({{0, 10, 0, 20, Mask::Causal}}, 5, 20), Catch::Contains("slice 0"));
  CHECK_THROWS_AS(ffa::plan_build({{5, 2, 0, 20, Mask::Full}}, 10, 20), flexcp::UserError);
  CHECK_THROWS_AS(ffa::plan_build({{0, 2, 0, 20, static_cast<Mask>(7)}}, 10, 20), flexcp::UserError);
  CHECK_THROWS_AS(ffa::plan_build({{0, 2, -1, 20, Mask::Full}}, 10, 20), flexcp::UserError);
  CHECK_THROWS_AS(ffa::plan_build({}, int64_t{1} << 31, 1), flexcp::UserError);
  CHECK_NOTHROW(ffa::plan_build({{7, 7, 0, 0, Mask::Full}}, 0, 0));  // empty: ignored
}
