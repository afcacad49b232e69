// The persistent forward kernel's static schedule (cuda/ffa_schedule.h, the function the kernel calls):
// every work tile goes to exactly one CTA, a CTA's tiles come in increasing order one per round and it
// stops at its first empty round, rounds alternate direction (serpentine), and on a longest-first list
// the CTAs' total work is more even than with plain striding.
#include <catch2/catch.hpp>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cuda/ffa_schedule.h"

namespace {

// Tiles of each CTA in the order it runs them, walking rounds as the kernel does (until the first -1).
std::vector<std::vector<int>> tiles_per_cta(int num_tiles, int grid) {
  std::vector<std::vector<int>> out(grid);
  for (int b = 0; b < grid; ++b)
    for (int r = 0;; ++r) {
      const int t = ffa::persistent_tile(r, b, grid, num_tiles);
      if (t < 0) break;
      out[b].push_back(t);
    }
  return out;
}

}  // namespace

TEST_CASE("persistent schedule covers every tile exactly once", "[ffa][schedule]") {
  // (tiles, grid): tiles < grid (the kernel launches min(SMs, tiles) CTAs, but the schedule must not
  // depend on it), equal, one partial round of either direction, many rounds, a grid of one.
  const std::vector<std::pair<int, int>> shapes = {{1, 1},   {5, 132}, {7, 7},     {8, 3},      {133, 132},
                                                   {263, 132}, {264, 132}, {1000, 132}, {1537, 114}, {40, 1}};
  for (const auto& [num_tiles, grid] : shapes) {
    CAPTURE(num_tiles, grid);
    const auto per_cta = tiles_per_cta(num_tiles, grid);
    std::vector<int> seen(num_tiles, 0);
    for (int b = 0; b < grid; ++b) {
      const auto& ts = per_cta[b];
      for (size_t r = 0; r < ts.size(); ++r) {
        REQUIRE(ts[r] >= 0);
        REQUIRE(ts[r] < num_tiles);
        ++seen[ts[r]];
        // One tile per round, in round r's block of grid tiles: increasing along the CTA's list.
        CHECK(ts[r] / grid == static_cast<int>(r));
      }
      // Every round before the CTA's last non-empty one had a tile for it (no gaps: the kernel stops at
      // the first -1).
      const int rounds = (num_tiles + grid - 1) / grid;
      CHECK(static_cast<int>(ts.size()) >= rounds - 1);
      CHECK(static_cast<int>(ts.size()) <= rounds);
    }
    for (int t = 0; t < num_tiles; ++t) {
      CAPTURE(t);
      CHECK(seen[t] == 1);
    }
    // Nothing past the end, whatever the round.
    for (int b = 0; b < grid; ++b) CHECK(ffa::persistent_tile(num_tiles / grid + 2, b, grid, num_tiles) == -1);
  }
}

TEST_CASE("persistent schedule is serpentine", "[ffa][schedule]") {
  const int grid = 132, num_tiles = 5 * grid;
  for (int r = 0; r < 5; ++r)
    for (int b = 0; b < grid; ++b) {
      CAPTURE(r, b);
      CHECK(ffa::persistent_tile(r, b, grid, num_tiles) == r * grid + (r % 2 == 0 ? b : grid - 1 - b));
    }
  // A partial odd round goes to the last CTAs (it runs right to left), a partial even round to the first.
  const auto odd = tiles_per_cta(grid + 10, grid);
  for (int b = 0; b < grid; ++b) CHECK(odd[b].size() == (b >= grid - 10 ? 2u : 1u));
  const auto even = tiles_per_cta(2 * grid + 10, grid);
  for (int b = 0; b < grid; ++b) CHECK(even[b].size() == (b < 10 ? 3u : 2u));
}

TEST_CASE("persistent schedule balances a longest-first list better than striding", "[ffa][schedule]") {
  // Causal attention, S = 8192, 192-row q tiles and 32 heads (shape (a)): item i (longest first) walks
  // 64 - floor(i * 1.5) key tiles or so; tile t = item t / 32. Lengths decrease along the tile list.
  const int heads = 32, items = 43, grid = 132, num_tiles = items * heads;
  std::vector<int> len(num_tiles);
  for (int t = 0; t < num_tiles; ++t) len[t] = std::max(1, 64 - (t / heads) * 3 / 2);
  const auto per_cta = tiles_per_cta(num_tiles, grid);
  std::vector<long> serp(grid, 0), strided(grid, 0);
  for (int b = 0; b < grid; ++b) {
    for (int t : per_cta[b]) serp[b] += len[t];
    for (int t = b; t < num_tiles; t += grid) strided[b] += len[t];
  }
  const long serp_max = *std::max_element(serp.begin(), serp.end());
  const long strided_max = *std::max_element(strided.begin(), strided.end());
  CHECK(serp_max < strided_max);  // the makespan (the longest CTA) is shorter
}

TEST_CASE("forward tile assignment covers every (q head, slab) of an item once", "[ffa][schedule]") {
  // (heads_q, group = heads_q / heads_kv, consumers): MHA, GQA 2, 3, 4 (the seed model), 6, 8, at three
  // consumers (D=64) and two (D=128).
  const std::vector<std::tuple<int, int, int>> cases = {{16, 1, 3}, {16, 2, 3}, {24, 3, 3}, {32, 4, 3},
                                                        {24, 6, 3}, {32, 8, 3}, {16, 1, 2}, {32, 4, 2}};
  for (const auto& [heads_q, group, nc] : cases) {
    CAPTURE(heads_q, group, nc);
    const int items = 5;
    std::vector<int> seen(items * heads_q * nc, 0);  // (item, q head, slab)
    int slab_tiles = 0;
    for (int tile = 0; tile < items * heads_q; ++tile) {
      const ffa::FwdTileAssign a = ffa::forward_tile_assign(tile, heads_q, group, nc);
      REQUIRE(a.item == tile / heads_q);
      const int kv = (tile % heads_q) / group;
      for (int c = 0; c < nc; ++c) {
        const int head = ffa::forward_consumer_head(a, c);
        const int slab = ffa::forward_consumer_slab(a, c);
        REQUIRE(head >= 0);
        REQUIRE(head < heads_q);
        CHECK(head / group == kv);  // one K/V stream per tile: every consumer's q head in its kv group
        ++seen[(a.item * heads_q + head) * nc + slab];
      }
      slab_tiles += a.slab >= 0;
    }
    for (size_t i = 0; i < seen.size(); ++i) {
      CAPTURE(i);
      CHECK(seen[i] == 1);
    }
    // Slab tiles wherever a group has nc heads to spare: group 4 at three consumers gives 3 of 4.
    CHECK(slab_tiles == items * (heads_q / group) * nc * (group / nc));
  }
}
