// Forward pass v8 (ForwardArgs::kernel = 3) and v10 (kernel 5, the same kernel on a persistent grid: the
// default of flexcp's ffa backend). v8 is the v4 TMA kernel (ffa_fwd_tma.cu) plus FlashAttention-3's
// intra-warpgroup overlap, a consumer ring of 3 warpgroups at D=64, a deeper K/V ring with separate K and
// V barriers, and a softmax that seldom rescales O and mostly needs one FMUL or FFMA and one MUFU per score
// (ZeroWindow for fp16; bf16: LazyRef, no test of the scores at all). docs/kernel-log.md "v8" and "v10"
// have the reasoning and the figures.
//
// A work tile is one q-side plan item (a q tile) of one query head: tile t = item t / heads_q, head
// t % heads_q. The plan sorts items longest first, so tile numbers are a global longest-first order.
// Kernel 5 at D=64 makes slab tiles of most of them (forward_tile_assign, cuda/ffa_schedule.h): where a
// kv head has three q heads to spare, a tile puts its three consumers on the same 64-row slab of the
// item, each for its own q head, and walks only the key tiles that slab needs; on a causal diagonal
// that skips the last key tile of a 192-row item for its first slabs (session 10, run 38: +0.6% on (a),
// +1.6% with 8 documents). The others stay hull tiles: consumer c on rows 64 c .. 64 c + 63, one head.
//   kernel 3   one CTA per work tile (grid = items x heads): each CTA sets up, fills its pipeline, runs
//              and writes out once; the prologue and the epilogue overlap no tensor-core work of its own.
//   kernel 5   min(SMs, tiles) CTAs; CTA b runs tiles persistent_tile(j, b, grid, tiles), j = 0, 1, ...
//              (cuda/ffa_schedule.h: round-robin, serpentine). The barriers are set up once; the K/V
//              ring and its phases run on across tiles, so the producer loads the next tile's first K/V
//              while the consumers finish the previous tile. Two Q buffers (tile j uses buffer j % 2),
//              so the next tile's Q lands while this one runs, and a tile's last P V goes to the tensor
//              cores in the next tile's first turn, beside its S_0: a consumer's epilogue then overlaps
//              the other consumers' GEMMs instead of leaving the tensor cores idle at every tile
//              boundary (session 9, docs/kernel-log.md run 21: +0.5-1% on (a), +2-3% with 8 documents).
// Per work tile:
//   warpgroup 0        producer. One thread issues TMA copies: Q, then K_0 (kernel 5: K_0, then Q once the
//                      consumers freed it), then per key tile n >= 1 K_n followed by V_{n-1} (the order
//                      the consumers use them), then V_last, into a kStages ring. K and V have their own
//                      full/empty mbarriers, so a K stage is refilled as soon as every consumer's S GEMM
//                      has read it, not after the P V GEMM as well.
//   warpgroups 1..NC   consumers, 64 query rows each: NC = 3 at D=64 (a 192-row q tile: the plan is built
//                      with fwd_tile_q = 192, see ffa::forward_tile_q), NC = 2 at D=128 (there S, the
//                      packed P and O alone take the 160 registers a thread of 3 consumers may have).
//                      Per key tile n a consumer, on its turn of the ring,
//                        issues S_n = Q K_n^T and O += P_{n-1} V_{n-1} back to back and passes the turn;
//                        waits for S_n only, masks it (boundary tiles only) and runs its softmax while
//                        P_{n-1} V_{n-1} and the next consumers' GEMMs keep the tensor cores busy;
//                        waits for P V, rescales O (rarely: see ZeroWindow) and packs P_n for the next turn.
//                      Its last P V waits for the first turn of its next tile (kernel 3: it is issued
//                      alone after the last softmax).
//                      At D=64 the P V GEMM runs over [V | ones] (N = 72), so O's extra columns carry the
//                      row sums (Shape::kOnesSum) and the softmax adds none itself.
//                      The turns go round the consumers through named barriers 1..NC, so the tensor cores
//                      see one consumer's GEMM pair after another's and every softmax has other GEMMs
//                      to hide behind.
//   epilogue           each consumer normalizes its rows, stages them in its own rows of the tile's Q
//                      buffer (its own S GEMMs, the only readers of those rows, are complete), and writes
//                      out and lse; kernel 5 then hands the buffer back to the producer.
// No CTA-wide barrier after the setup. Tiles, masks and empty rows as in the other forward kernels.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_hopper.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"
#include "cuda/ffa_lazy_ref.h"
#include "cuda/ffa_schedule.h"
#include "cuda/ffa_tma.h"
#include "cuda/ffa_wgmma.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBN = kPlanTileQCols;  // keys per tile (the q-side plan's column tile)

// Everything that differs between the two head dims.
template <int D>
struct Shape {
  static constexpr int kConsumers = D == 64 ? 3 : 2;
  static constexpr int kBM = 64 * kConsumers;  // query rows per CTA (= the plan's fwd_tile_q)
  // D=128: 2 stages of K+V take 128 KB. (3 fit beside Q alone, 230,504 bytes, and measured the same on
  // the H100, run 9 of docs/kernel-log.md; kernel 5's staging tile needs the room.)
  static constexpr int kStages = D == 64 ? 4 : 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // setmaxnreg budgets: 128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536.
  static constexpr int kProducerRegs = kConsumers == 3 ? 32 : 24;
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : 240;
  static constexpr uint32_t kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  // D=64: the row sums come out of the P V GEMM, over [V | ones] (N = 72): one kBN x 64 block of 1.0 in
  // shared memory serves every V stage (reached through the V descriptor's leading byte offset). It
  // takes the softmax's 64 FADDs per thread and tile off the issue slots, which bound D=64 more than the
  // exponentials do (docs/kernel-log.md, session 6, runs 11-12: +2.5-4% on (a)); l is then the sum of
  // the bf16-rounded P that O itself uses. At D=128 V has two 64-column blocks, so the ones would need
  // a third at a fixed stride from every stage: not done (the softmax bounds D=128 less).
  static constexpr bool kOnesSum = D == 64;
  static constexpr uint32_t kOnesBytes = kOnesSum ? kBN * 128 : 0;
  static constexpr int kPV = D + (kOnesSum ? 8 : 0);  // the P V GEMM's N
  // mbarriers: full_q and empty_q for each of two Q buffers, full/empty for K and V per stage; then two
  // 8-byte slots for kernel 5's key-tile counts (tiles_q), then an int per consumer warp (lost_rows).
  static constexpr int kSmem =
      kQBytes + 2 * kStages * kKVBytes + kOnesBytes + 1024 + 8 * (6 + 4 * kStages) + 16 * kConsumers;
  static_assert(kSmem <= 227 * 1024, "dynamic shared memory per block on sm_90");
  // Kernel 5 adds a second Q buffer (kBM rows; the epilogue of a work tile stages in its tile's buffer):
  // 197856 bytes in all at D=64 (with the ones block), 197776 at D=128, of the 232448 (227 KB) a block may have.
  static constexpr int kPersistentExtraSmem = kQBytes;
  static_assert(kSmem + kPersistentExtraSmem <= 227 * 1024, "kernel 5 needs more shared memory than a block has");
};

// P = 2^(s * c - m) with c = scale_log2 applied in fp32 (the scale stays exact). m is what a row subtracts,
// in one of three states:
//   -inf      no visible key yet (P = 2^-inf = 0 for masked columns; rows subtract 0 there);
//   0         the row's max lies in the zero window [ZeroWindow::kMin, kMax] (log2 units): bf16 [-60, 64],
//             so P <= 2^64 (O's and l's fp32 sums hold that) and the row's largest P >= 2^-60 is a
//             normal float with everything that matters below it; fp16 holds only to 65504, hence [-2, 8];
//   stale     otherwise: the row's max, kept until a tile's max exceeds it by kStaleMaxLog2, so P <= 2^8
//             and O is rescaled only when it moves.
// After its first keys nearly every row subtracts 0, and in a tile where every row of the warp does and
// no score exceeds the window, an element costs one FMUL and one MUFU: no per-row max, no FFMA against
// it, no rescale vote (session 8, docs/kernel-log.md run 18: +2.5% on (a), +3% on (c)). The result is the
// same softmax for any m: out = O / l and lse = m + log2(l). (bf16 goes further: LazyRef below; this is fp16's.)
template <typename T>
struct ZeroWindow {
  static constexpr float kMin = -60.f, kMax = 64.f;
};
template <>
struct ZeroWindow<__half> {
  static constexpr float kMin = -2.f, kMax = 8.f;
};
constexpr float kStaleMaxLog2 = 8.f;

// Columns [lo, hi) of the key tile at c0 that query row i may see under cut c, relative to c0 (empty
// when i lies outside the cut's rows). The mask of one element is then two integer compares.
// All six fields are read unconditionally and combined without short-circuits, so this compiles to
// selects, not branches around loads.
__device__ __forceinline__ void visible_cols(const CutSlice& c, int i, int c0, int& lo, int& hi) {
  const int q0 = c.q_start, q1 = c.q_end, k0 = c.k_start, k1 = c.k_end, dlo = c.lo, dhi = c.hi;
  lo = max(k0, i + dlo) - c0;
  hi = ((i >= q0) & (i < q1)) ? min(k1, i + dhi + 1) - c0 : lo;
}

// Slab tiles (forward_tile_assign, cuda/ffa_schedule.h) in kernel 5 at D=64 (three consumers); the other
// instantiations keep hull tiles only, one Q box per tile and the consumers' own count of key tiles.
template <int D, bool kPersistent>
constexpr bool kSlabTiles = kPersistent && D == 64;
// Key tiles of item `it`: the tiles of all its runs.
__device__ __forceinline__ int item_key_tiles(const Item& it, const Run* runs) {
  int n = 0;
#pragma unroll 1
  for (int ri = it.run_begin; ri < it.run_end; ++ri) n += runs[ri].tiles;
  return n;
}

// Key tiles of item `it` that query rows [a, b) need: the item's count less the trailing tiles that no
// row of [a, b) sees. Only masked runs can hold such tiles (every row of an item sees all of a full run);
// a tile counts as seen where it meets the hull of the rows' visible keys under its run's cut (the
// bounds of visible_cols rise with the row, so the first and the last row in the cut bound it): a tile
// kept by that test may still be wholly masked for these rows, which costs time, never correctness.
// The producer computes it and hands it to the consumers (tiles_q), so they walk the same key tiles.
__device__ __forceinline__ int rows_key_tiles(const Item& it, const Run* runs, const CutSlice* cuts, int a, int b) {
  if (a >= b) return 0;  // a slab past the item's last row (the last item of a q range)
  int n = item_key_tiles(it, runs);
#pragma unroll 1
  for (int ri = it.run_end - 1; ri >= it.run_begin; --ri) {
    const Run run = runs[ri];
    if (!run.masked) return n;
    const CutSlice c = cuts[run.cut];
    const int a2 = max(a, c.q_start), b2 = min(b, c.q_end);
    const int lo = max(c.k_start, a2 + c.lo), hi = min(c.k_end, b2 + c.hi);  // keys of rows a2 .. b2 - 1
#pragma unroll 1
    for (int t = run.tiles - 1; t >= 0; --t) {
      const int c0 = run.begin + t * kBN;
      if (a2 < b2 && lo < hi && lo < c0 + kBN && hi > c0) return n;
      --n;
    }
  }
  return n;
}

// Element k (0..31) of row r (0, 1) of the thread's part of an S tile in the wgmma accumulator layout.
__device__ __forceinline__ constexpr int elem(int k, int r) { return 4 * (k >> 1) + 2 * r + (k & 1); }

// The row max of row r over the thread's 32 columns and its quad (the row's 4 threads), as a tree (depth
// 5 over the thread's columns, not a chain of 16 dependent FMNMX): the row's exponentials wait for it.
__device__ __forceinline__ float row_max_tree(const float (&sc)[kBN / 2], int r) {
  float t[kBN / 8];
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) t[j] = fmaxf(sc[4 * j + 2 * r], sc[4 * j + 2 * r + 1]);
  static_assert(kBN / 8 == 16, "the tree below folds 16 column pairs");
#pragma unroll
  for (int j = 0; j < 8; ++j) t[j] = fmaxf(t[j], t[j + 8]);
#pragma unroll
  for (int j = 0; j < 4; ++j) t[j] = fmaxf(t[j], t[j + 4]);
  float mx = fmaxf(fmaxf(t[0], t[2]), fmaxf(t[1], t[3]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
}

// The row max of row r over the thread's 32 columns and its quad, on the float bits as signed integers
// with Hopper's three-input integer max (VIMNMX3: 16 instructions where a float tree needs 31). Floats
// >= +0 order like their bits, so where the row has such a value this is the float max, bit for bit; a row
// with none (negatives, -0, -inf: bits < 0) gets a negative result that says only "max <= 0".
__device__ __forceinline__ int row_max_bits(const float (&sc)[kBN / 2], int r) {
  int a[12];
#pragma unroll
  for (int k = 0; k < 10; ++k)
    a[k] = __vimax3_s32(__float_as_int(sc[elem(3 * k, r)]), __float_as_int(sc[elem(3 * k + 1, r)]),
                        __float_as_int(sc[elem(3 * k + 2, r)]));
  a[10] = __float_as_int(sc[elem(30, r)]);
  a[11] = __float_as_int(sc[elem(31, r)]);
#pragma unroll
  for (int k = 0; k < 4; ++k) a[k] = __vimax3_s32(a[3 * k], a[3 * k + 1], a[3 * k + 2]);
  int mi = max(__vimax3_s32(a[0], a[1], a[2]), a[3]);
  mi = max(mi, __shfl_xor_sync(0xffffffffu, mi, 1));
  return max(mi, __shfl_xor_sync(0xffffffffu, mi, 2));
}

// Sets the elements of an S tile (wgmma accumulator layout, the thread's rows row0 and row0 + 8, key tile
// at c0) that cut hides to -inf.
__device__ __forceinline__ void mask_tile(float (&sc)[kBN / 2], const CutSlice& cut, int row0, int c0, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // Visible columns of this row relative to the thread's first column 2 (lane % 4): element (j, e)
    // is column 8j + e of that, so each test compares against a constant.
    int lo, hi;
    visible_cols(cut, row0 + 8 * r, c0 + (lane & 3) * 2, lo, hi);
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (8 * j + e < lo || 8 * j + e >= hi) sc[4 * j + 2 * r + e] = -INFINITY;
  }
}

// The row maxima of an S tile times c, from the integer max (row_max_bits) where a row has a score >= +0.
// Where it has none, that says only "<= 0": such a row gets -inf, or, if want_exact says its m could move
// on it, the exact float tree (its shuffles need the whole warp, hence the vote).
__device__ __forceinline__ void tile_row_max(const float (&sc)[kBN / 2], float c, const bool (&want_exact)[2],
                                             float (&m_tile)[2]) {
  bool exact[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int mi = row_max_bits(sc, r);
    m_tile[r] = mi >= 0 ? __int_as_float(mi) * c : -INFINITY;
    exact[r] = mi < 0 && want_exact[r];
  }
  if (__any_sync(0xffffffffu, exact[0] || exact[1])) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mx = row_max_tree(sc, r);
      if (exact[r]) m_tile[r] = mx * c;
    }
  }
}

// P = 2^(s * c - m_sub[r]) for every element of an S tile (r: the element's row); with kSums also the
// thread's partial row sums of P (per row two chains of 16 adds).
template <bool kSums>
__device__ __forceinline__ void exp_tile(float (&sc)[kBN / 2], float c, const float (&m_sub)[2], float (&sums)[2]) {
  float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
  for (int k = 0; k < kBN / 2; ++k) {
    sc[k] = exp2_ftz(fmaf(sc[k], c, -m_sub[(k >> 1) & 1]));
    if constexpr (kSums) sum[(k >> 1) & 1][k & 1] += sc[k];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) sums[r] = sum[r][0] + sum[r][1];
}

// Online softmax of one 64 x 128 S tile in the wgmma accumulator layout (thread element 4j + 2r + e is row
// (lane / 4) + 8r of the warp's 16, column 8j + 2 (lane % 4) + e), c = scale_log2: masks it (kMasked:
// boundary tiles only), leaves P (unnormalized, fp32) in sc, updates m and, with kSums, the thread's
// partial row sums l. Returns whether O must be scaled by alpha (warp-uniform).
template <typename T, bool kMasked, bool kSums>
__device__ __forceinline__ bool softmax_tile(float (&sc)[kBN / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             float c, const CutSlice* cut, int row0, int c0, int lane) {
  constexpr float kZeroMax = ZeroWindow<T>::kMax, kZeroMin = ZeroWindow<T>::kMin;
  if constexpr (kMasked) mask_tile(sc, *cut, row0, c0, lane);
  alpha[0] = alpha[1] = 1.f;
  float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // per row, two chains of 16 adds (kSums only)
  if (__all_sync(0xffffffffu, m[0] == 0.f && m[1] == 0.f)) {
    // The fast path. Only whether some score exceeds kZeroMax matters: the max over both rows' bits, 21
    // VIMNMX3 and one vote (c > 0 and kZeroMax > 0, and floats >= +0 order like their bits).
    int a[22];
#pragma unroll
    for (int k = 0; k < 21; ++k)
      a[k] = __vimax3_s32(__float_as_int(sc[3 * k]), __float_as_int(sc[3 * k + 1]), __float_as_int(sc[3 * k + 2]));
    a[21] = __float_as_int(sc[63]);
#pragma unroll
    for (int k = 0; k < 7; ++k) a[k] = __vimax3_s32(a[3 * k], a[3 * k + 1], a[3 * k + 2]);
    const int mx = __vimax3_s32(__vimax3_s32(a[0], a[1], a[2]), __vimax3_s32(a[3], a[4], a[5]), max(a[6], a[21]));
    if (!__any_sync(0xffffffffu, mx > __float_as_int(kZeroMax / c))) {
#pragma unroll
      for (int k = 0; k < kBN / 2; ++k) {
        sc[k] = exp2_ftz(sc[k] * c);
        if constexpr (kSums) sum[(k >> 1) & 1][k & 1] += sc[k];
      }
      if constexpr (kSums) {
#pragma unroll
        for (int r = 0; r < 2; ++r) l[r] += sum[r][0] + sum[r][1];
      }
      return false;
    }
  }
  // The general path: a row's first visible keys, a score beyond kZeroMax, or a row outside the window.
  // A tile max "<= 0" can move m only from -inf or from a stale max below -kStaleMaxLog2.
  float m_tile[2];
  const bool low[2] = {m[0] < -kStaleMaxLog2, m[1] < -kStaleMaxLog2};
  tile_row_max(sc, c, low, m_tile);
  float m_sub[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // m[r] = -inf (no visible key yet): any finite tile max moves it and alpha = 2^-inf = 0.
    const bool moves = m_tile[r] > m[r] + (m[r] == 0.f ? kZeroMax : kStaleMaxLog2);
    const float m_new = (m_tile[r] >= kZeroMin && m_tile[r] <= kZeroMax) ? 0.f : m_tile[r];
    alpha[r] = moves ? exp2_ftz(m[r] - m_new) : 1.f;
    m[r] = moves ? m_new : m[r];
    // Only a masked tile can leave a row with no visible key so far (m = -inf): subtract 0 there, so its
    // P = 2^-inf = 0 rather than NaN. In an unmasked tile every row's max is finite.
    m_sub[r] = (kMasked && m[r] == -INFINITY) ? 0.f : m[r];
  }
  float sums[2];
  exp_tile<kSums>(sc, c, m_sub, sums);
  if constexpr (kSums) {
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = fmaf(l[r], alpha[r], sums[r]);
  }
  return __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f);
}

// The lazy reference (bf16; fp16's P could not hold its range). A row subtracts a reference m that is not
// its max: P = 2^(s * c - m) costs one FFMA and one MUFU per score, with no max and no window test per tile
// (ZeroWindow's fast path has 21 VIMNMX3 and a vote there). bf16 P has fp32's exponent range, so nothing
// needs P <= 1: the reference starts at the row's first max plus kBias (its largest P is 2^-kBias), and
// only the row sums l are watched, after each P V (at D=64 that GEMM returns them in O's ones column; at
// D=128 they are the softmax's own, four partial sums per row):
//   after each P V (lazy_rescale), a row with l > kRescaleAbove gets O, l and the next tile's P (not yet
//     multiplied by V) scaled by 2^-k and m raised by k, a power of two (exact), which brings l back to
//     [2^-50, 2^-49). A key tile's P are taken before the check of the tile before it, so two
//     consecutive key tiles together may raise a row's scores by up to 77 log2 units (53 in natural-log
//     units) above the largest it had before l can pass kRecomputeAbove;
//   a row whose l passed kRecomputeAbove, or whose P overflowed (l = inf), is marked (l = NaN, which every
//     later P V keeps), its lse written as NaN, and after the CTA's last work tile one warp computes it
//     again exactly from global memory (forward_row_exact): slow, and only for logits that jump that far
//     within a row from one key tile to the next.
// The row's largest P stays >= 2^-63 (up to 2^13 keys; the P that flush to 0 lie 2^63 below it), and
// O <= l * max|v| < 2^64 max|v|, so O's and l's fp32 sums keep the max-subtracting softmax's precision.
// (LazyRef's constants, lazy_shift and lazy_factor: cuda/ffa_lazy_ref.h, tested on the CPU.)
template <typename T>
constexpr bool kLazyRef = std::is_same<T, __nv_bfloat16>::value;

// The lazy reference's softmax of one S tile (as softmax_tile; with kSums it adds the thread's partial row
// sums to l, without them O's ones column has the sums). A row with no visible key so far (m = -inf) takes
// its reference from this tile's exact max; every other row subtracts its m as it stands.
template <bool kMasked, bool kSums>
__device__ __forceinline__ void softmax_tile_lazy(float (&sc)[kBN / 2], float (&m)[2], float (&l)[2], float c,
                                                  const CutSlice* cut, int row0, int c0, int lane) {
  if constexpr (kMasked) mask_tile(sc, *cut, row0, c0, lane);
  if (__all_sync(0xffffffffu, m[0] != -INFINITY && m[1] != -INFINITY)) {
    float sums[2];
    exp_tile<kSums>(sc, c, m, sums);
    if constexpr (kSums) l[0] += sums[0], l[1] += sums[1];
    return;
  }
  // A row's first visible keys (a work tile's first key tile, or later behind a mask): its exact max.
  float m_tile[2];
  const bool first[2] = {m[0] == -INFINITY, m[1] == -INFINITY};
  tile_row_max(sc, c, first, m_tile);
  float m_sub[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (m[r] == -INFINITY) m[r] = m_tile[r] + LazyRef::kBias;  // stays -inf where the tile hides every key
    m_sub[r] = m[r] == -INFINITY ? 0.f : m[r];                  // then P = 2^-inf = 0, not NaN
  }
  float sums[2];
  exp_tile<kSums>(sc, c, m_sub, sums);
  if constexpr (kSums) l[0] += sums[0], l[1] += sums[1];
}

// The lazy reference's check after a P V (O complete, P of the next key tile in sc, not yet multiplied):
// rows whose sum passed kRescaleAbove are brought back to [2^-50, 2^-49) by a power of two, rows whose
// sum passed kRecomputeAbove (or is NaN) are marked for the epilogue's exact recompute. The sums: with
// kSums the thread's partial sums in l (a quad's lanes share a row: they decide on the quad's total), else
// O's ones column (kO = O's registers: element kO - 4 + 2 r holds row r's whole sum; l is unused).
template <bool kSums, int kO>
__device__ __forceinline__ void lazy_rescale(float (&o)[kO], float (&l)[2], float (&sc)[kBN / 2], float (&m)[2]) {
  constexpr int kL = kO - 4;
  float lr[2] = {kSums ? l[0] : o[kL], kSums ? l[1] : o[kL + 2]};
  if (!__any_sync(0xffffffffu, !(lr[0] <= LazyRef::kRescaleAbove) || !(lr[1] <= LazyRef::kRescaleAbove)))
    return;
  // Per row a factor (1 where the row stays), applied to every row of the warp without branches (a
  // per-thread branch around accumulator registers makes ptxas spill).
  float f[2];
  bool mark[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (kSums) lr[r] = quad_row_sum(lr[r]);
    mark[r] = lazy_lost(lr[r]);  // also NaN: a row marked before stays marked
    const int shift = lazy_shift(lr[r]);
    f[r] = lazy_factor(shift);
    m[r] += static_cast<float>(shift);
  }
#pragma unroll
  for (int k = 0; k < kO; ++k) o[k] *= f[(k >> 1) & 1];
#pragma unroll
  for (int k = 0; k < kBN / 2; ++k) sc[k] *= f[(k >> 1) & 1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the epilogue's mark
    if constexpr (kSums)
      l[r] = mark[r] ? NAN : l[r] * f[r];
    else
      o[kL + 2 * r] = mark[r] ? NAN : o[kL + 2 * r];
  }
}

// Out and lse of query row `row` of q head h in work item `item`, computed exactly by one warp (all 32
// lanes) from global memory: an online softmax over every key the item's runs show the row, in fp32 with
// the running max subtracted, 32 keys at a time (lane j takes key j of the chunk, its whole dot product
// with q; the chunk's max and sum over the warp; then each lane adds the chunk's P V to its D / 32 columns
// of O). The lazy reference's fallback for rows whose logits jump too far (above); called after the CTA's
// last work tile, where no GEMM state is live (in the epilogue, inlined beside the loop's registers, it
// made ptxas serialize the wgmma). Rows are 16-byte aligned (the kernel's TMA maps need that too).
template <typename T, int D>
__device__ __forceinline__ void forward_row_exact(const FwdParams& p, int item, int h, int row) {
  constexpr int kPer = D / 32;  // O's columns per lane
  const int lane = threadIdx.x & 31, hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(row) * p.q_st + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + hk * p.v_sh + lane * kPer;
  // Eight elements of a row at a 16-byte boundary, as floats.
  auto load8 = [](const T* src, float (&dst)[8]) {
    T e[8];
    *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<float>(e[i]);
  };
  float qf[D];
#pragma unroll
  for (int c = 0; c < D / 8; ++c) load8(q + 8 * c, *reinterpret_cast<float(*)[8]>(&qf[8 * c]));
  float o[kPer] = {};
  float mx = -INFINITY, l = 0.f;
  const Item it = p.side.items[item];
  for (int ri = it.run_begin; ri < it.run_end; ++ri) {
    const Run run = p.side.runs[ri];
    for (int t = 0; t < run.tiles; ++t) {
      const int c0 = run.begin + t * kBN;
      int lo = 0, hi = kBN;
      if (run.masked) visible_cols(p.side.cuts[run.cut], row, c0, lo, hi);
      // visible_cols bounds the row's keys, not the tile's: they may start before this tile or run on
      // past it (the run's next tile counts those).
      lo = max(lo, 0);
      hi = min(hi, min(kBN, p.num_k - c0));
      for (int j0 = lo; j0 < hi; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j < hi) {
          const T* kr = k + static_cast<int64_t>(c0 + j) * p.k_st;
          float acc = 0.f;
#pragma unroll
          for (int c = 0; c < D / 8; ++c) {
            float kf[8];
            load8(kr + 8 * c, kf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc = fmaf(qf[8 * c + i], kf[i], acc);
          }
          s = acc * p.scale_log2;
        }
        float cmax = s;  // (fmaxf passes over a NaN score; its P below is NaN and makes l NaN)
#pragma unroll
        for (int w = 16; w >= 1; w >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, w));
        const float m_new = fmaxf(mx, cmax);
        if (m_new == -INFINITY) continue;  // no visible key so far (warp-uniform)
        const float a = exp2f(mx - m_new), pj = exp2f(s - m_new);
        float psum = pj;
#pragma unroll
        for (int w = 16; w >= 1; w >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, w);
        l = l * a + psum;
#pragma unroll
        for (int i = 0; i < kPer; ++i) o[i] *= a;
        const int n = min(32, hi - j0);
        for (int u = 0; u < n; ++u) {
          const float pu = __shfl_sync(0xffffffffu, pj, u);
          const T* vr = v + static_cast<int64_t>(c0 + j0 + u) * p.v_st;
#pragma unroll
          for (int i = 0; i < kPer; ++i) o[i] = fmaf(pu, static_cast<float>(vr[i]), o[i]);
        }
        mx = m_new;
      }
    }
  }
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(row) * p.o_st + h * p.o_sh + lane * kPer;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) out[i] = T(o[i] * inv);
  if (lane == 0) p.lse[h * p.lse_sh + static_cast<int64_t>(row) * p.lse_st] = row_lse(mx, l);
}

// kPersistent = false: kernel 3 (v8), one CTA per work tile, blockIdx.x = item * heads_q + head.
// kPersistent = true: kernel 5 (v10), at most one CTA per SM, each running the work tiles
// persistent_tile(j, blockIdx.x, gridDim.x, num_items * heads_q) for j = 0, 1, ... (cuda/ffa_schedule.h).
// A work tile t is item t / heads_q, head t % heads_q in both.
template <typename T, int D, bool kPersistent>
__global__ void __launch_bounds__(Shape<D>::kThreads, 1)
    fwd_overlap_kernel(const FwdParams p, const __grid_constant__ CUtensorMap tm_q,
                       const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
  using S = Shape<D>;
  constexpr int kNC = S::kConsumers, kBM = S::kBM, kStages = S::kStages;
  constexpr int kCB = D / 64;  // 64-column (128-byte) blocks per row
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023u) & ~1023u;  // 128B-swizzled tiles want 1024-byte alignment
  unsigned char* smem = smem_raw + (sQ - raw);
  // Q buffers: work tile j uses buffer j % kQBuffers, for its Q and then as its epilogue's staging tile.
  // Kernel 5 has two, so that the next work tile's Q lands while this one runs, and a work tile's
  // epilogue can wait until the next work tile's first S GEMM is on the tensor cores.
  constexpr int kQBuffers = kPersistent ? 2 : 1;
  constexpr bool kSlab = kSlabTiles<D, kPersistent>;
  constexpr bool kLazy = kLazyRef<T>;
  const uint32_t sK = sQ + kQBuffers * S::kQBytes, sV = sK + kStages * S::kKVBytes;
  const uint32_t sOnes = sV + kStages * S::kKVBytes;  // S::kOnesBytes of 1.0 (kOnesSum only)
  // mbarriers (8 bytes each): full_q (one per Q buffer), per stage full_k, full_v, empty_k, empty_v, then
  // empty_q (one per Q buffer; kernel 5 only).
  const uint32_t full_q = sOnes + S::kOnesBytes;
  const uint32_t full_k = full_q + 16, full_v = full_k + 8 * kStages;
  const uint32_t empty_k = full_v + 8 * kStages, empty_v = empty_k + 8 * kStages;
  const uint32_t empty_q = empty_v + 8 * kStages;
  // Slab tiles: key tiles of the work tile in Q buffer b (an int at tiles_q + 4 b). The producer counts
  // them and stores the count before its arrive on full_q[b] (a release), so a consumer reads it after its
  // wait there (an acquire) and walks no run list of its own before starting the tile.
  const uint32_t tiles_q = empty_q + 16;
  // The lazy reference: per consumer warp an int (warp w at lost_rows[w - 4]), nonzero once the warp
  // marked a row it lost (lse NaN); the warp computes those rows again after the CTA's last work tile.
  int* const lost_rows = reinterpret_cast<int*>(smem + (tiles_q - sQ) + 16);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // The warpgroup index broadcast from lane 0, so that ptxas knows it is warp-uniform: the Q descriptors
  // built from it (cw) then live in uniform registers and are ready before a consumer takes its turn,
  // where from a per-thread value each wgmma waited for a register-to-uniform move (session 10, run 28:
  // +1% on (a), +2% on (c)).
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);
  // Kernel 3's work tile, read before the barrier setup so that its latency hides there (kernel 5 reads
  // its tiles in for_each_tile; these go unused and the compiler drops them).
  const QWorkTile tile_cta = q_work_tile(p.side, p.heads_q, p.group, blockIdx.x);
  const Run* runs = p.side.runs;

  if (tid == 0) {
    if constexpr (kLazy)
      for (int w = 0; w < 4 * kNC; ++w) lost_rows[w] = 0;
    for (int b = 0; b < kQBuffers; ++b) mbar_init(full_q + 8 * b, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k + 8 * s, 1);
      mbar_init(full_v + 8 * s, 1);
      mbar_init(empty_k + 8 * s, 4 * kNC);  // one arrival per consumer warp
      mbar_init(empty_v + 8 * s, 4 * kNC);
    }
    if (kPersistent)
      for (int b = 0; b < kQBuffers; ++b) mbar_init(empty_q + 8 * b, 4 * kNC);
    mbar_init_fence();
  }
  if constexpr (S::kOnesSum) {  // the ones block, written once, read by every P V GEMM (async proxy)
    const uint32_t one2 = pack2<T>(1.f, 1.f);
    for (uint32_t off = tid * 16; off < S::kOnesBytes; off += S::kThreads * 16)
      *reinterpret_cast<uint4*>(smem + (sOnes - sQ) + off) = make_uint4(one2, one2, one2, one2);
    fence_async_smem();
  }
  __syncthreads();

  // fn(item, assignment, kv head, key tiles, j) for this CTA's work tiles in order, j = 0, 1, ...; the
  // producer and every consumer walk the same list. The mbarriers are initialized once (above): their
  // phases, and the K/V ring position, run on from one work tile to the next. Kernel 5 has slab tiles
  // (forward_tile_assign, cuda/ffa_schedule.h): every consumer on one 64-row slab, each for its own q head,
  // walking only the key tiles the slab needs; kernel 3 has hull tiles only (consumer c on slab c).
  auto for_each_tile = [&](auto&& fn, bool count) {
    if constexpr (kPersistent) {
      const int num_tiles = p.side.num_items * p.heads_q;
#pragma unroll 1
      for (int j = 0;; ++j) {
        const int tile = persistent_tile(j, blockIdx.x, gridDim.x, num_tiles);
        if (tile < 0) break;
        const FwdTileAssign as = kSlab ? forward_tile_assign(tile, p.heads_q, p.group, kNC)
                                       : FwdTileAssign{tile / p.heads_q, -1, tile % p.heads_q};
        const Item it = p.side.items[as.item];  // a copy: read once, not again after each store
        int n_tiles = 0;
        if (count && as.slab >= 0) {
          const int a = it.row_begin + 64 * as.slab;
          n_tiles = rows_key_tiles(it, runs, p.side.cuts, a, min(it.row_end, a + 64));
        } else if (count) {
          n_tiles = item_key_tiles(it, runs);
        }
        fn(it, as, as.head0 / p.group, n_tiles, j);
      }
    } else {
      fn(tile_cta.it, FwdTileAssign{static_cast<int>(blockIdx.x) / p.heads_q, -1, tile_cta.h}, tile_cta.hk,
         count ? item_key_tiles(tile_cta.it, runs) : 0, 0);
    }
  };
  // Consumer c's rows of a work tile: its Q is in rows 64 c .. 64 c + 63 of the buffer, its query rows
  // are [base + 64 c, end), so that staging row r is query row base + r (the epilogue's rule).
  struct ConsumerRows {
    int base, end;
  };
  auto consumer_rows = [&](const Item& it, const FwdTileAssign& as, int c) {
    const int slab = forward_consumer_slab(as, c);
    return ConsumerRows{it.row_begin + 64 * (slab - c), min(it.row_end, it.row_begin + 64 * slab + 64)};
  };

  // ---------------------------------------------------------------------------------------------
  // Producer, per work tile: Q, K_0 (kernel 5: K_0, then Q), then (K_n, V_{n-1}) for n >= 1, then V_last.
  // n is the ring position: key tiles counted over the CTA's work tiles so far plus the tile's own index;
  // tile n lives in stage n % kStages, and its full/empty barriers are in phase n / kStages there. The
  // consumers count the same positions (n_base + their index), so across tiles the stages and phases
  // agree as within one: each K/V stage is filled once per lap of the ring, whichever tile the lap
  // belongs to, and a wait for phase k is only reached after phase k - 1 of the same barrier was seen
  // complete, so a parity wait can never mistake phase k - 2 for k. A tile with no key tiles loads no
  // K/V and moves no K/V phase.
  if (wg == 0) {
    setmaxnreg_dec<S::kProducerRegs>();
    if (tid == 0) {
      int n = 0;
      for_each_tile([&](const Item& it, const FwdTileAssign& as, int hk, int n_tiles, int j) {
        // Q of work tile j into buffer b = j % kQBuffers. Kernel 5 first waits until every consumer warp
        // released work tile j - 2's use of it (empty_q[b] completes its phase (j - 2) / 2 once all 4 * kNC
        // warps arrived; they arrive after their epilogue, which stages in the buffer, wrote it out). A
        // consumer arrives only after it saw full_q[b]'s phase (j - 2) / 2, which this thread started, so
        // empty_q[b] is never more than one phase ahead of this wait.
        auto load_q = [&]() {
          const int b = j % kQBuffers;
          if (kPersistent && j >= kQBuffers) mbar_wait(empty_q + 8 * b, ((j / kQBuffers) - 1) & 1);
          if constexpr (kSlab) {
            *reinterpret_cast<volatile int*>(smem + (tiles_q - sQ) + 4 * b) = n_tiles;  // before the arrive
            mbar_expect_tx(full_q + 8 * b, S::kQBytes);
            // Consumer c's 64 rows (its q head, its slab) into rows 64 c .. 64 c + 63 of the buffer.
#pragma unroll
            for (int c = 0; c < kNC; ++c)
#pragma unroll
              for (int cb = 0; cb < kCB; ++cb)
                tma_load_3d(sQ + b * S::kQBytes + cb * (kBM * 128) + c * (64 * 128), &tm_q, cb * 64,
                            forward_consumer_head(as, c), it.row_begin + 64 * forward_consumer_slab(as, c),
                            full_q + 8 * b);
          } else {
            mbar_expect_tx(full_q + 8 * b, S::kQBytes);
#pragma unroll
            for (int cb = 0; cb < kCB; ++cb)
              tma_load_3d(sQ + b * S::kQBytes + cb * (kBM * 128), &tm_q, cb * 64, as.head0, it.row_begin,
                          full_q + 8 * b);
          }
        };
        if constexpr (!kPersistent) load_q();
        // Tile `pos` (a ring position) of K or V (keys from c0) into its stage, once every consumer warp
        // released the stage's previous tile (pos - kStages).
        auto load = [&](const CUtensorMap* tm, uint32_t dst, uint32_t full, uint32_t empty, int pos, int c0) {
          const int s = pos % kStages;
          if (pos >= kStages) mbar_wait(empty + 8 * s, ((pos / kStages) - 1) & 1);
          mbar_expect_tx(full + 8 * s, S::kKVBytes);
#pragma unroll
          for (int cb = 0; cb < kCB; ++cb)
            tma_load_3d(dst + s * S::kKVBytes + cb * (kBN * 128), tm, cb * 64, hk, c0, full + 8 * s);
        };
        const int n_first = n;
        int c_prev = 0;
#pragma unroll 1
        for (int ri = it.run_begin; ri < it.run_end && n - n_first < n_tiles; ++ri) {
          const Run run = runs[ri];
#pragma unroll 1
          for (int t = 0; t < run.tiles && n - n_first < n_tiles; ++t, ++n) {
            const int c0 = run.begin + t * kBN;
            load(&tm_k, sK, full_k, empty_k, n, c0);
            if (n > n_first)
              load(&tm_v, sV, full_v, empty_v, n - 1, c_prev);
            else if constexpr (kPersistent)
              load_q();  // after K_0: the wait for the Q release does not hold the first K back
            c_prev = c0;
          }
        }
        if (n > n_first)
          load(&tm_v, sV, full_v, empty_v, n - 1, c_prev);
        else if constexpr (kPersistent)
          load_q();  // no key tiles: the consumers still wait for Q (then write out 0, lse -inf)
      }, true);
    }
    return;
  }

  // ---------------------------------------------------------------------------------------------
  // Consumers.
  setmaxnreg_inc<S::kConsumerRegs>();
  const int cw = wg - 1;                                    // consumer 0 .. kNC - 1
  const int bar_mine = 1 + cw, bar_next = 1 + (cw + 1) % kNC;  // named barriers (0 is __syncthreads)

  // The turn ring: named barrier 1 + c is consumer c's turn (bar.sync by c, bar.arrive by c - 1, 256
  // threads). One turn token circulates: the last consumer gives consumer 0 the first turn, every turn
  // ends with an arrive on the next consumer's barrier, and consumer 0 takes the last consumer's final
  // arrive at the end. So each barrier has at most one arrive outstanding, which its sync consumes before
  // another can be posted (the next arrive on it needs the token to go round). The ring starts and ends
  // once for all of a CTA's work tiles (below and after the tile loop): the token just goes on round
  // across tiles, since every consumer of a CTA takes one turn per key tile of the same work tiles.
  // (Starting and ending it per tile would let the last consumer post the next tile's start arrive on
  // barrier 1 before consumer 0 took the previous end arrive: two arrives of one warpgroup on one barrier,
  // which completes it without consumer 0 and deadlocks the ring.) A work tile with no key tiles takes no
  // turn; a CTA with no work tile still pairs the start arrive with the end sync.
  if (cw == kNC - 1) named_bar_arrive(1, 256);  // the ring starts with consumer 0

  // Consumer state that lives across work tiles: a work tile's last P V is not issued on its own after
  // its last softmax (with the tensor cores waiting for this consumer's epilogue and its next tile's
  // first softmax) but in the next work tile's first turn, beside that tile's S_0; the work tile's
  // epilogue then runs while the other consumers' GEMMs keep the tensor cores busy. `pending` says that
  // a work tile's last P (in pa) and its O, m, l wait for that; `prev` says which work tile it was.
  float o[S::kPV / 2];  // O; with kOnesSum also its row sums (fragment D / 8: columns D .. D + 7)
  float m[2], l[2];
  float sc[kBN / 2];         // S_n, then P_n in fp32
  uint32_t pa[kBN / 16][4];  // P_{n-1} as the A operand of the P V GEMM (bf16/fp16 pairs)
  struct PendingTile {
    int h, row_begin, row_end;
    int buffer;  // its Q buffer, where its epilogue stages
    int pos;     // ring position of its last key tile (the V of the pending P V)
  } prev{};
  bool pending = false;
  int n_base = 0;  // ring position of the work tile's first key tile (the producer's n there)

  // Ring position pos: its K/V stage and its phase parity there.
  auto stage = [](int pos) { return pos % kStages; };
  auto parity = [](int pos) { return static_cast<uint32_t>((pos / kStages) & 1); };
  // S = Q K^T for the key tile at ring position pos (SS-wgmma m64n128k16, K-major operands), Q from buffer b;
  // the caller fences and commits. Each operand's descriptor is built once per GEMM and stepped by
  // desc_add (one add per k-step; the full build is ~6 dependent uniform-datapath ops in front of every
  // wgmma). opaque_u32 keeps NVVM from hoisting the Q descriptors of every k-step out of the tile loop.
  auto issue_s = [&](int pos, int b) {
    const uint64_t q_d = smem_desc(opaque_u32(sQ + b * S::kQBytes + cw * 64 * 128), 16, 1024);
    const uint64_t k_d = smem_desc(sK + stage(pos) * S::kKVBytes, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk & 3) * 32;
      wgmma_ss<T, kBN>(sc, desc_add(q_d, (kk >> 2) * (kBM * 128) + koff),
                       desc_add(k_d, (kk >> 2) * (kBN * 128) + koff), kk > 0 ? 1 : 0);
    }
  };
  // O += P V for the V tile at ring position pos (RS-wgmma, V read N-major: LBO = the next 64-column block).
  auto issue_pv = [&](int pos) {
    const uint32_t v_st = sV + stage(pos) * S::kKVBytes;
    // With kOnesSum, columns D .. D + 7 of B come from the ones block: the leading byte offset (the
    // distance to B's next 64 columns) points there from this stage.
    const uint64_t v_d = smem_desc(v_st, S::kOnesSum ? sOnes - v_st : kBN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma_rs_tb<T, S::kPV>(o, pa[kk], desc_add(v_d, kk * 16 * 128));
  };
  // One arrival per warp once the warp's wgmma reads of the stage are complete.
  auto release = [&](uint32_t empty, int pos) {
    if (lane == 0) mbar_arrive(empty + 8 * stage(pos));
  };
  // O += P V for the V tile at ring position pos, after waiting for that V to land; the caller waits for the GEMM.
  auto issue_pv_landed = [&](int pos) {
    mbar_wait(full_v + 8 * stage(pos), parity(pos));
    wg_fence();  // as FA3 does before each GEMM (ptxas inserts it otherwise: C7519)
    issue_pv(pos);
    wg_commit();
  };
  auto pack_p = [&]() { acc_to_a_frags<T>(pa, sc); };
  // Epilogue of work tile t (O, l and m as its rows left them) through this warp's own 16 rows of the
  // tile's Q buffer: every S GEMM of this consumer on it is complete, and each of a consumer's S GEMMs
  // reads only the consumer's own 64 rows. Kernel 5 then hands the buffer back to the producer: the
  // proxy fence orders these generic writes and reads before the next Q's TMA writes.
  auto epilogue = [&](const PendingTile& t, const float (&ot)[S::kPV / 2], const float (&mt)[2],
                      const float (&lt)[2]) {
    unsigned char* staging = smem + t.buffer * S::kQBytes;
    T* out = static_cast<T*>(p.out) + t.h * p.o_sh;
    float* lse = p.lse + t.h * p.lse_sh;
    // The lazy reference's whole row sums and lost rows (below), found before the store so that O's
    // registers die there.
    float l_row[2] = {0.f, 0.f};
    bool lost[2] = {false, false};
    if constexpr (kLazy) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l_row[r] = S::kOnesSum ? ot[S::kPV / 2 - 4 + 2 * r] : quad_row_sum(lt[r]);
        lost[r] = lazy_lost(l_row[r]);
      }
    }
    if constexpr (S::kOnesSum) {
      // The row sums are O's column D (every column of fragment D / 8 holds them), whole in every lane.
      const float l_full[2] = {ot[D / 2], ot[D / 2 + 2]};
      store_out_lse_warp_rows<T, D, kBM, true>(staging, (warp - 4) * 16,
                                               *reinterpret_cast<const float(*)[D / 2]>(&ot[0]), l_full, mt, out,
                                               p.o_st, lse, p.lse_st, t.row_begin, t.row_end);
    } else {
      store_out_lse_warp_rows<T, D, kBM>(staging, (warp - 4) * 16, ot, lt, mt, out, p.o_st, lse, p.lse_st,
                                         t.row_begin, t.row_end);
    }
    if constexpr (kLazy) {
      // Rows the lazy reference lost (marked, or l past kRecomputeAbove after the last P V): lse NaN says
      // so, and the warp's flag has them computed again after the CTA's last work tile. A row whose last
      // P V raised l above kRescaleAbove gets the lse of its (m, l) brought back by lazy_rescale's rule:
      // the same bits as where a later check did that (kernel 3 checks after key tiles that kernel 5's
      // slab tiles skip); out = O / l is the same either way. (The quad's lanes hold the same l; these
      // writes follow the store's own lse write, which store_out_lse_warp_rows orders by __syncwarp.)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = t.row_begin + (warp - 4) * 16 + (lane >> 2) + 8 * r;
        const float l = l_row[r];
        const int shift = lazy_shift(l);
        if (row < t.row_end && (lost[r] || (shift != 0 && (lane & 3) == 0)))
          lse[static_cast<int64_t>(row) * p.lse_st] =
              lost[r] ? NAN : row_lse(mt[r] + static_cast<float>(shift), l * lazy_factor(shift));
      }
      if (__any_sync(0xffffffffu, lost[0] || lost[1]) && lane == 0) lost_rows[warp - 4] = 1;
    }
    if constexpr (kPersistent) {
      fence_async_smem();
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_q + 8 * t.buffer);
    }
  };
  // The pending work tile's last P V outside the ring (no S GEMM of ours to pair it with), then its epilogue.
  auto flush = [&]() {
    issue_pv_landed(prev.pos);
    wg_wait<0>();
    reg_fence(o);
    reg_fence_u(pa);
    release(empty_v, prev.pos);
    epilogue(prev, o, m, l);
    pending = false;
  };

  for_each_tile([&](const Item& it, const FwdTileAssign& as, int /*hk*/, int n_counted, int j) {
    const ConsumerRows rows = consumer_rows(it, as, cw);
    const int row_lo = rows.base + (warp - 4) * 16 + (lane >> 2);  // the thread's rows: row_lo, row_lo + 8
    const int b = j % kQBuffers;
    const PendingTile cur{forward_consumer_head(as, cw), rows.base, rows.end, b, 0};

    // Mask (boundary tiles only) and softmax of S_n, whose run is `run`; t = tile index in the run. The
    // work tile's first key tile too takes the unmasked form where its run is unmasked (run 8 of session 6:
    // +1% on (a), +5% with 8 documents, where work tiles are short), at the price of a second inlined copy.
    auto softmax = [&](const Run& run, int t, float (&alpha)[2]) -> bool {
      const int c0 = run.begin + t * kBN;
      if constexpr (kLazy) {
        if (run.masked)
          softmax_tile_lazy<true, !S::kOnesSum>(sc, m, l, p.scale_log2, &p.side.cuts[run.cut], row_lo, c0, lane);
        else
          softmax_tile_lazy<false, !S::kOnesSum>(sc, m, l, p.scale_log2, nullptr, row_lo, c0, lane);
        return false;
      }
      if (run.masked)
        return softmax_tile<T, true, !S::kOnesSum>(sc, m, l, alpha, p.scale_log2, &p.side.cuts[run.cut], row_lo, c0,
                                                   lane);
      return softmax_tile<T, false, !S::kOnesSum>(sc, m, l, alpha, p.scale_log2, nullptr, row_lo, c0, lane);
    };

    // Q of work tile j: full_q[b]'s phase j / kQBuffers (the producer loads Q once per work tile, even with
    // no key tiles).
    mbar_wait(full_q + 8 * b, static_cast<uint32_t>((j / kQBuffers) & 1));
    // Slab tiles: the producer's count, read by lane 0 (whose arrive on empty_q[b] after the epilogue then
    // orders the read before the producer's next store there) and broadcast.
    int n_tiles = n_counted;
    if constexpr (kSlab) {
      int n = 0;
      if (lane == 0) n = *reinterpret_cast<volatile const int*>(smem + (tiles_q - sQ) + 4 * b);
      n_tiles = __shfl_sync(0xffffffffu, n, 0);
    }
    if (n_tiles == 0) {
      // No key tiles: no turn; out 0 and lse -inf for every row (l = 0), staged through its Q buffer. (Its
      // own zeros, not O's registers: ptxas would see them written while a P V on them might be in flight,
      // C7515, and serialize every wgmma of the kernel.)
      if (pending) flush();
      const float zeros[S::kPV / 2] = {}, no_max[2] = {-INFINITY, -INFINITY}, no_sum[2] = {0.f, 0.f};
      epilogue(cur, zeros, no_max, no_sum);
      return;
    }

    // Key tile 0: S_0, and in the same turn the pending work tile's last P V (P in pa, O in o).
    int ri = it.run_begin, t = 0;
    Run run = runs[ri];
    float alpha[2];
    mbar_wait(full_k + 8 * stage(n_base), parity(n_base));
    named_bar_sync(bar_mine, 256);
    wg_fence();
    issue_s(n_base, b);
    wg_commit();
    if (pending) issue_pv_landed(prev.pos);
    named_bar_arrive(bar_next, 256);
    // Both GEMMs waited for at once: a wait for S_0 alone would leave the pending P V in flight on one
    // path only, and ptxas, which does not correlate the two branches on `pending`, then serializes every
    // wgmma of the kernel (C7514). The P V is short, and the other consumers' GEMMs run meanwhile.
    wg_wait<0>();
    reg_fence(sc);
    reg_fence(o);
    reg_fence_u(pa);
    release(empty_k, n_base);
    if (pending) release(empty_v, prev.pos);
    // The pending tile's m and l (its epilogue needs them) before this tile's softmax starts afresh.
    const float m_prev[2] = {m[0], m[1]}, l_prev[2] = {l[0], l[1]};
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
    softmax(run, t, alpha);  // this tile's O starts at 0: no rescale
    pack_p();
    if (pending) {
      epilogue(prev, o, m_prev, l_prev);
      pending = false;
    }
#pragma unroll
    for (int jj = 0; jj < S::kPV / 2; ++jj) o[jj] = 0.f;

    for (int n = 1; n < n_tiles; ++n) {
      if (++t == run.tiles) {  // tile n's run (read now: its latency hides behind the GEMMs)
        run = runs[++ri];
        t = 0;
      }
      const int pos = n_base + n;
      mbar_wait(full_k + 8 * stage(pos), parity(pos));
      // Our turn: S_n and P_{n-1} V_{n-1} go to the tensor cores back to back.
      named_bar_sync(bar_mine, 256);
      wg_fence();
      issue_s(pos, b);
      wg_commit();
      issue_pv_landed(pos - 1);
      named_bar_arrive(bar_next, 256);
      wg_wait<1>();  // S_n is complete; P_{n-1} V_{n-1} may still run
      reg_fence(sc);
      release(empty_k, pos);
      const bool rescale = softmax(run, t, alpha);
      wg_wait<0>();
      reg_fence(o);
      reg_fence_u(pa);
      release(empty_v, pos - 1);
      // O holds P_0 V_0 + ... + P_{n-1} V_{n-1} against the previous m: bring it to the new one.
      if constexpr (kLazy) {
        lazy_rescale<!S::kOnesSum>(o, l, sc, m);
      } else if (rescale) {
#pragma unroll
        for (int jj = 0; jj < S::kPV / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[4 * jj + e] *= alpha[e >> 1];
      }
      pack_p();
    }
    prev = cur;
    prev.pos = n_base + n_tiles - 1;
    pending = true;
    n_base += n_tiles;
  }, !kSlab);

  if (pending) flush();
  if (cw == 0) named_bar_sync(1, 256);  // consume the last consumer's final arrive (or the start one)
  if constexpr (kLazy) {
    // The rows this warp lost, again, exactly: its rows of each of the CTA's work tiles whose lse it
    // marked NaN (its own flag and its own global writes: no other warp's are read).
    __syncwarp();
    if (lost_rows[warp - 4] == 0) return;
    for_each_tile([&](const Item& it, const FwdTileAssign& as, int, int, int) {
      const int h = forward_consumer_head(as, cw);
      const ConsumerRows rows = consumer_rows(it, as, cw);
      const int row = rows.base + (warp - 4) * 16 + (lane & 15);
      const float* lse = p.lse + h * p.lse_sh;
      const unsigned lost =
          __ballot_sync(0xffffffffu, lane < 16 && row < rows.end && isnan(lse[static_cast<int64_t>(row) * p.lse_st]));
#pragma unroll 1
      for (int i = 0; i < 16; ++i)
        if ((lost >> i) & 1u) forward_row_exact<T, D>(p, as.item, h, row - (lane & 15) + i);
    }, false);
  }
}

// Streaming multiprocessors of the current device, read once per device: kernel 5's grid size.
int sm_count() {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) throw std::runtime_error(std::string("ffa forward (v10): ") + cudaGetErrorString(err));
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 = not read yet; a race reads the same value twice
  if (dev < kMaxDevices) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess || sms <= 0)
    throw std::runtime_error(std::string("ffa forward (v10): SM count: ") + cudaGetErrorString(err));
  if (dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

template <bool kPersistent, typename T, int D>
void launch_t(TypeTag<T>, DimTag<D>, int dtype, const FwdParams& p, cudaStream_t stream) {
  using S = Shape<D>;
  const char* name = kPersistent ? "ffa forward (v10)" : "ffa forward (v8)";
  const int64_t tiles = static_cast<int64_t>(p.side.num_items) * p.heads_q;
  if (tiles == 0) return;
  if (tiles > INT32_MAX) throw std::runtime_error(std::string(name) + ": more than 2^31 - 1 work tiles");
  // Kernel 5: one CTA per SM at most (its shared memory allows no second one), never more than tiles.
  const int64_t grid = kPersistent ? std::min<int64_t>(tiles, sm_count()) : tiles;
  const int smem = S::kSmem + (kPersistent ? S::kPersistentExtraSmem : 0);
  // Q in 64-row boxes where each consumer's rows are loaded on their own (slab tiles take other heads' rows).
  const CUtensorMap tq = make_tensor_map(p.q, dtype, p.num_q, p.heads_q, p.q_st, p.q_sh, D,
                                         kSlabTiles<D, kPersistent> ? 64 : S::kBM);
  // No keys at all (a context-parallel stage with nothing to attend): no item has a key tile, so K and V
  // are never read, but k/v may be null, which a tensor map cannot describe; map q in their place.
  const bool no_keys = p.num_k == 0;
  const CUtensorMap tk = no_keys ? make_tensor_map(p.q, dtype, p.num_q, p.heads_q, p.q_st, p.q_sh, D, kBN)
                                 : make_tensor_map(p.k, dtype, p.num_k, p.heads_kv, p.k_st, p.k_sh, D, kBN);
  const CUtensorMap tv = no_keys ? tk : make_tensor_map(p.v, dtype, p.num_k, p.heads_kv, p.v_st, p.v_sh, D, kBN);
  launch_checked(name, fwd_overlap_kernel<T, D, kPersistent>, grid, S::kThreads, smem, stream, p, tq, tk, tv);
}

}  // namespace

int forward_overlap_tile_q(int head_dim) { return head_dim == 64 ? Shape<64>::kBM : Shape<128>::kBM; }

void launch_forward_overlap(int kernel, int dtype, int head_dim, const FwdParams& p, cudaStream_t stream) {
  const char* name = "ffa forward (v8/v10)";
  if (kernel == 5)
    return dispatch_dtype_dim(name, dtype, head_dim, [&](auto t, auto d) { launch_t<true>(t, d, dtype, p, stream); });
  dispatch_dtype_dim(name, dtype, head_dim, [&](auto t, auto d) { launch_t<false>(t, d, dtype, p, stream); });
}

}  // namespace detail
}  // namespace ffa
