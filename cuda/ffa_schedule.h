// Static schedule of a persistent grid (forward kernel 5, cuda/ffa_fwd_overlap.cu): which work tile a CTA
// runs in each round. A plain header (no CUDA needed) so that the CPU tests check the same function the
// kernel calls (test/ffa_schedule_test.cpp).
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

}  // namespace ffa

#undef FFA_SCHEDULE_HD
