// Static schedule of a persistent grid (forward kernel 5, cuda/ffa_fwd_overlap.cu): which work tile a CTA
// runs in each round, and which q head and rows each of its consumers takes in it. A plain header (no CUDA
// needed) so that the CPU tests check the same functions the kernel calls (test/ffa_schedule_test.cpp).
#pragma once

#if defined(__CUDACC__)
#define FFA_SCHEDULE_HD __host__ __device__
#else
#define FFA_SCHEDULE_HD
#endif

namespace ffa {

// Work tile of CTA `cta` (0 <= cta < grid) in round `round` (0, 1, ...) when `grid` CTAs share
// `num_tiles` tiles numbered in the order they should start (the forward's q-side items are sorted longest
// first, heads fastest, so tile numbers are a global longest-first list); -1 when the CTA has no tile
// in that round, and then in no later round either (a CTA loops while the result is >= 0).
// Serpentine: round r hands tiles [r * grid, (r + 1) * grid) out left to right when r is even and right to
// left when r is odd, so the CTA that got the longest tile of one round gets the shortest of the next:
// over two rounds every CTA's pair sums to about the same length, where plain striding (cta + r * grid)
// gives CTA 0 the longest tile of every round.
FFA_SCHEDULE_HD inline int persistent_tile(int round, int cta, int grid, int num_tiles) {
  const int tile = round * grid + ((round & 1) ? grid - 1 - cta : cta);
  return tile < num_tiles ? tile : -1;
}

// Which q head and which 64-row slab of its item each consumer of a forward work tile takes (forward
// kernel 5 at D=64; kernel 3 and D=128 take hull tiles only). A work tile is (item tile / heads_q, r = tile % heads_q);
// r picks a kv head g = r / group and k = r % group within its group of q heads. With nc consumers,
// the first nc * (group / nc) values of k make slab tiles: all nc consumers over the same slab
// k % nc of the item, each for its own q head of the group (q heads g * group + nc * (k / nc) + c), so
// the tile walks only the key tiles that slab needs (on a causal diagonal the last key tile of a
// 192-row item is dead for its first slabs: 4.65% of the pairs computed on (a), docs/kernel-log.md,
// session 10). The other k make hull tiles, as before: consumer c on slab c, all for q head
// g * group + k. Over the group's `group` tiles every (q head, slab) pair of the item comes once.
struct FwdTileAssign {
  int item;   // q-side item
  int slab;   // the slab of every consumer (a slab tile), or -1: consumer c on slab c (a hull tile)
  int head0;  // a slab tile: consumer c's q head is head0 + c; a hull tile: every consumer's q head
};

FFA_SCHEDULE_HD inline FwdTileAssign forward_tile_assign(int tile, int heads_q, int group, int nc) {
  const int r = tile % heads_q, g = r / group, k = r % group;
  FwdTileAssign a{tile / heads_q, -1, r};
  if (k < nc * (group / nc)) {
    a.slab = k % nc;
    a.head0 = g * group + nc * (k / nc);
  }
  return a;
}

// Consumer c's q head and 64-row slab of its item in a work tile assigned as `a`.
FFA_SCHEDULE_HD inline int forward_consumer_head(const FwdTileAssign& a, int c) {
  return a.slab >= 0 ? a.head0 + c : a.head0;
}
FFA_SCHEDULE_HD inline int forward_consumer_slab(const FwdTileAssign& a, int c) { return a.slab >= 0 ? a.slab : c; }

}  // namespace ffa

#undef FFA_SCHEDULE_HD
