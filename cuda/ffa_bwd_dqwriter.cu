// dK/dV (and dQ) pass of the backward: backward kernel 5 of cuda/ffa.h (v8-bwd; how it got here, and the
// removed kernel 4: docs/kernel-log.md "v8-bwd"). The CTA, tiles and GEMMs of the v7 TMA backward (kernel
// 0, since removed: docs/kernel-log.md "v7"): one 128-key k-side plan item of one kv head, 128-query steps
// at D=64, 64-query steps at D=128; with the two consumer warpgroups out of lockstep, so that one
// warpgroup's element-wise work runs while the other's GEMMs keep the tensor cores busy:
//   - the dS^T exchange is split into arrive (own half written) and sync (other half written), and each
//     warpgroup issues its dV and dK GEMMs (which need only its own P^T, dS^T) before it waits: the
//     earlier warpgroup's dV/dK GEMMs run during the later one's element-wise work. Only the dQ GEMM
//     (dS over all 128 keys) waits for the other half. Barrier ids alternate with the step parity, so
//     an arrive can never be counted for the wrong step;
//   - dQ writer warps: warps 1 and 2 of the producer warpgroup issue the bulk reductions of consumer
//     0's and 1's staged dQ rows (and wait for them to be read); a consumer only stages its dQ rows in
//     shared memory and syncs (FlashAttention-3's dQ writer). Each writer walks the same (head, run,
//     step) loops as its consumer and derives each step's rows itself, so nothing but the staged rows
//     passes between them. No bulk async-group work on the consumers' critical path;
//   - lse and delta come from the preprocessing kernel in a per-head layout (BwdParams::stats: per
//     head, lse * log2(e) (+inf for rows with no key and past the end) then delta, padded rows), so
//     the loader fetches them with one TMA box per 64-query plan tile (the v7 lanes' strided loads
//     used one 32-byte sector per 4-byte value). Rows are the box's innermost dimension, where a TMA
//     start must be 16-byte aligned (else: illegal instruction): a box holds the 68 rows from the
//     4-aligned row at or below the tile's first, and the consumers read from offset q0 & 3.
// Roles:
//   warpgroup 0: warp 0 (lane 0 issues) loads K and V once, then per step Q, dO and the stats into a
//                2-stage ring (full/empty mbarriers); warps 1, 2: dQ writers; warp 3 idles. setmaxnreg.dec.
//                (The loader and the writers each walk the (head, run, step) loops themselves.)
//   warpgroups 1, 2: consumers, 64 keys each, sharing every Q/dO tile, per step:
//     S^T = K Q^T, dP^T = V dO^T  (SS-wgmma m64nQS)     -> P^T, dS^T = P^T * (dP^T - delta)
//     dS^T -> shared memory (double buffer), arrive
//     dV += P^T dO, dK += dS^T Q  (RS-wgmma)            sync on the other half of dS^T
//     dQ  = dS K over all 128 keys (SS-wgmma, 64 queries x 64 columns: QS = 128 query half w, D = 128
//           column block w) -> a 128B-swizzled fp32 tile in shared memory -> writer warp w -> two
//           tensor-map bulk reductions into the fp32 accumulator.
// A step whose second query half lies outside the run (last step of an odd run at D=64) gets that
// half's stats from the padding rows past num_q (lse = +inf, so P = dS = 0 there); its writer skips the
// half's reduction.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_hopper.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"
#include "cuda/ffa_tma.h"
#include "cuda/ffa_wgmma.cuh"

// The dQ hand-off: a consumer stages its 64 x 64 fp32 dQ block unpadded in the 128B-swizzled layout of two
// 64-row x 32-column boxes and its writer warp reduces it with two tensor-map bulk reductions (tm_dq over
// dq_accum), so the buffer is read, and freed, with 2 TMA operations instead of the 64 row reductions
// (256 B each) of padded rows before: +7-14% for the whole backward on the H100 (docs/kernel-log.md "dQ
// tensor reduce" and "Run 12").

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBN = kPlanTileK, kTileQ = kBwdTileQ, kThreads = 384;
static_assert(kBN == 128 && kTileQ == 64, "two consumer warpgroups x 64 keys, 64-query plan tiles");
static_assert(kStatsPad >= 128 && kStatsPad % 8 == 0,
              "a step's boxes, and the padding box of a half step (4-aligned), stay inside the stats rows");
// One consumer's dQ job: 64 rows x 64 columns as two 8 KB boxes (columns [0, 32), [32, 64)) of 64 rows of
// 128 bytes, 128B-swizzled (16-byte chunk c of row r at chunk c ^ (r & 7)); 1024-byte aligned.
constexpr int kDqBoxBytes = 64 * 32 * 4;
constexpr int kDqBytes = 2 * kDqBoxBytes;
// A stage's stats: per 64-query plan tile, one TMA box of kStatsBoxRows values of lse * log2(e), then as
// many of delta, from the 4-aligned row at or below the tile's first (a box's start in its innermost
// dimension must be 16-byte aligned); tiles 128-byte aligned (TMA destinations).
constexpr int kStatsBoxRows = kTileQ + 4;
constexpr int kStatsBoxBytes = 2 * kStatsBoxRows * 4;
constexpr int kStatsTile = (kStatsBoxBytes + 127) / 128 * 128;  // bytes
constexpr int kStatsTileFloats = kStatsTile / 4;

// Named barriers (0 is __syncthreads). Thread counts: 256 = both consumers, 160 = one consumer + its
// writer warp.
constexpr int kBarEpilogue = 1;
constexpr int kBarDs = 2;       // + 2 w + (step & 1): consumer w's half of the step's dS^T is written
// The dQ hand-off barriers are synced by both sides, not arrived at by one: the waiting side is already
// there (the writer has nothing else to do; the consumer reaches kBarDqFull only after both passed
// kBarDqEmpty), so it costs nothing.
constexpr int kBarDqFull = 6;   // + w: consumer w's dQ job is staged
constexpr int kBarDqEmpty = 8;  // + w: writer w's reductions have read the staging buffer
static_assert(kBarDqEmpty + 1 < 16, "16 named barriers per CTA");

// Queries per step: two 64-query plan tiles at D=64; one at D=128 (S^T + dP^T + dK + dV accumulators
// would need 256 registers at 128).
template <int D>
constexpr int queries_per_step() {
  return D == 64 ? 128 : 64;
}

template <int D>
struct Smem {
  static constexpr int QS = queries_per_step<D>();
  static constexpr uint32_t kKV = kBN * D * 2, kQ = QS * D * 2, kS = kBN * QS * 2, kStats = QS / kTileQ * kStatsTile;
  static constexpr uint32_t sK = 0, sV = sK + kKV, sQ = sV + kKV, sdO = sQ + 2 * kQ, sdS = sdO + 2 * kQ;
  static constexpr uint32_t sdQ = sdS + 2 * kS, sStats = sdQ + 2 * kDqBytes, bars = sStats + 2 * kStats;
  static constexpr uint32_t total = bars + 5 * 8 + 1024;  // full_kv, full[2], empty[2]; + alignment slack
  static_assert(sStats % 128 == 0, "TMA destination alignment");
  static_assert(sdQ % 1024 == 0 && kDqBytes % 1024 == 0, "128B-swizzled TMA source: 1024-byte aligned boxes");
};

// Bulk tensor reduction global += shared (fp32, the tensor map's type) of the box of tmap at (x, y, z), read
// from src (the map's swizzled box layout). Tracked by this thread's bulk async-groups, as bulk_reduce_add_f32.
// Boxes reaching past the tensor's bounds are clipped: elements outside it are not written.
__device__ __forceinline__ void tma_reduce_add_3d(const void* tmap, uint32_t src, int x, int y, int z) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(x), "r"(y), "r"(z)
               : "memory");
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_dqwriter_kernel(const BwdParams p, const __grid_constant__ CUtensorMap tm_q,
                        const __grid_constant__ CUtensorMap tm_do, const __grid_constant__ CUtensorMap tm_k,
                        const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_stats
                        ,
                        const __grid_constant__ CUtensorMap tm_dq
    ) {
  using L = Smem<D>;
  constexpr int QS = L::QS;
  constexpr int kCB = D / 64;          // 64-column (128-byte) blocks
  constexpr int kTiles = QS / kTileQ;  // plan tiles per step
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const int tid = threadIdx.x, warp = tid >> 5;
  // The warpgroup index broadcast from lane 0, so that ptxas keeps it and the descriptors built from it
  // in uniform registers (as in the forward; session 10, run 29: backward alone +1-1.5%).
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);
  // mbarriers: K/V loaded (full_kv), stage s loaded (full + 8 s), stage s consumed (empty + 8 s).
  // (Each role derives its addresses from base itself: values live across the role split would hold
  // registers in the producer's 24.)
  auto barriers = [base] { return base + L::bars; };

  if (tid == 0) {
    const uint32_t full_kv = barriers(), full = full_kv + 8, empty = full_kv + 24;
    mbar_init(full_kv, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(full + 8 * s, 1);     // the loader's arrive + the Q, dO, stats bytes (tx)
      mbar_init(empty + 8 * s, 256);  // every consumer thread
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<24>();
    const int lane = tid & 31;
    if (warp == 1 || warp == 2) {
      // dQ writer of consumer w: walks the consumer's steps (the loops below) and derives each step's
      // rows itself; two syncs per step (kBarDqEmpty, kBarDqFull), no end marker: after its last step it
      // waits for its reductions and exits. One copy per warp (w a compile-time constant: fewer live
      // registers in the producer's 24).
      auto writer = [&](auto w_tag) {
        constexpr int w = decltype(w_tag)::value;
        const uint32_t stage = base + L::sdQ + w * kDqBytes;
        // Minimal live state (h, ri, t): the run and item fields are re-read after each barrier (L1 hits).
        const Item* item = p.k_side.items + blockIdx.x / p.heads_kv;
        const int h_end = (blockIdx.x % p.heads_kv + 1) * p.group;
        for (int h = h_end - p.group; h < h_end; ++h) {
          for (int ri = item->run_begin; ri < item->run_end; ++ri) {
            for (int t = 0; t < p.k_side.runs[ri].tiles; t += kTiles) {
              named_bar_sync(kBarDqEmpty + w, 160);  // the previous rows have been read
              named_bar_sync(kBarDqFull + w, 160);
              const Run run = p.k_side.runs[ri];
              // QS = 128: the second query half lies outside the run on an odd run's last step (dS = 0).
              const int row0 = run.begin + t * kTileQ + (QS == 128 ? w * 64 : 0);
              const bool in_run = QS == 64 || w == 0 || t + 1 < run.tiles;
              // Two 64-row x 32-column boxes; rows past num_q (the last tile of the sequence) are clipped
              // by the tensor map's bounds. The consumers' proxy fence preceded kBarDqFull; this one, after
              // it, orders their staged rows before the async proxy's read on the issuing thread's side too.
              if (lane == 0) {
                if (in_run) {
                  fence_async_smem();
#pragma unroll
                  for (int b = 0; b < 2; ++b)
                    tma_reduce_add_3d(&tm_dq, stage + b * kDqBoxBytes, (D == 128 ? w * 64 : 0) + b * 32, h, row0);
                }
                bulk_commit();
                bulk_wait_read<0>();
              }
              __syncwarp();
            }
          }
        }
        bulk_wait<0>();  // the shared source must outlive the reductions
      };
      if (warp == 1)
        writer(std::integral_constant<int, 0>{});
      else
        writer(std::integral_constant<int, 1>{});
      return;
    }
    if (warp != 0) return;
    // The loader: lane 0 issues the copies, the warp walks the steps with it.
    const uint32_t full_kv = barriers(), full = full_kv + 8, empty = full_kv + 24;
    const uint32_t sK = base + L::sK, sV = base + L::sV, sQ = base + L::sQ, sdO = base + L::sdO;
    const uint32_t sStats = base + L::sStats;
    const int hk = blockIdx.x % p.heads_kv;
    const Item it = p.k_side.items[blockIdx.x / p.heads_kv];
    const Run* runs = p.k_side.runs;
    const int c0 = it.row_begin;
    if (lane == 0) {
      mbar_expect_tx(full_kv, 2 * L::kKV);
#pragma unroll
      for (int cb = 0; cb < kCB; ++cb) {
        tma_load_3d(sK + cb * (kBN * 128), &tm_k, cb * 64, hk, c0, full_kv);
        tma_load_3d(sV + cb * (kBN * 128), &tm_v, cb * 64, hk, c0, full_kv);
      }
    }
    int n = 0;
    for (int g = 0; g < p.group; ++g) {
      const int h = hk * p.group + g;
      for (int ri = it.run_begin; ri < it.run_end; ++ri) {
        const Run run = runs[ri];
        for (int t = 0; t < run.tiles; t += kTiles, ++n) {
          const int s = n & 1;
          if (n >= 2) mbar_wait(empty + 8 * s, ((n >> 1) - 1) & 1);
          const int q0 = run.begin + t * kTileQ;
          if (lane == 0) {
            mbar_expect_tx(full + 8 * s, 2 * L::kQ + kTiles * kStatsBoxBytes);
#pragma unroll
            for (int cb = 0; cb < kCB; ++cb) {
              tma_load_3d(sQ + s * L::kQ + cb * (QS * 128), &tm_q, cb * 64, h, q0, full + 8 * s);
              tma_load_3d(sdO + s * L::kQ + cb * (QS * 128), &tm_do, cb * 64, h, q0, full + 8 * s);
            }
            // Stats per plan tile, from the 4-aligned row below (the consumers skip q0 & 3 values). The
            // last step of an odd run (QS = 128) has one tile in the run: its second tile's stats come
            // from the padding rows past num_q (lse = +inf: P = dS = 0, and delta = 0), which is all the
            // consumers need to ignore those queries; stats_rows - kStatsBoxRows - 4 is 4-aligned
            // (stats_rows is a multiple of 8) and, past num_q + 56, all padding.
#pragma unroll
            for (int k = 0; k < kTiles; ++k) {
              const int row = t + k < run.tiles ? (q0 + k * kTileQ) & ~3 : p.stats_rows - kStatsBoxRows - 4;
              tma_load_3d(sStats + s * L::kStats + k * kStatsTile, &tm_stats, row, 0, h, full + 8 * s);
            }
          }
          __syncwarp();
        }
      }
    }
    return;
  }

  setmaxnreg_inc<240>();
  const uint32_t full_kv = barriers(), full = full_kv + 8, empty = full_kv + 24;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t sK = base + L::sK, sV = base + L::sV, sQ = base + L::sQ, sdO = base + L::sdO, sdS = base + L::sdS;
  const uint32_t sdQ = base + L::sdQ;
  const int lane = tid & 31;
  const int hk = blockIdx.x % p.heads_kv;
  const Item it = p.k_side.items[blockIdx.x / p.heads_kv];
  const Run* runs = p.k_side.runs;
  const int c0 = it.row_begin;
  const float* stats_all = reinterpret_cast<const float*>(smem + L::sStats);  // [2 stages][kStats / 4]
  const int cw = wg - 1;      // consumer warpgroup: keys [c0 + 64 cw, c0 + 64 cw + 64)
  const int wq = warp & 3;    // warp within the warpgroup: 16 keys, and 16 rows of the dQ job
  const int key_lo = c0 + cw * 64 + wq * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  const uint32_t k_wg = sK + cw * 64 * 128, v_wg = sV + cw * 64 * 128;
  const uint32_t dq_stage = sdQ + cw * kDqBytes;
  const int job = D == 128 ? cw : 0;  // dQ column block
  const int mb = QS == 128 ? cw : 0;  // dQ query block of the step

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) dk[n] = dv[n] = 0.f;

  mbar_wait(full_kv, 0);
  int n = 0;
  for (int g = 0; g < p.group; ++g) {  // the kv head's query heads (the loader picks the head's tiles)
    for (int ri = it.run_begin; ri < it.run_end; ++ri) {
      const Run run = runs[ri];
      const bool masked = run.masked;
      CutSlice cut{};
      if (masked) cut = p.k_side.cuts[run.cut];
      for (int t = 0; t < run.tiles; t += kTiles, ++n) {
        const int s = n & 1;
        const int q0 = run.begin + t * kTileQ;
        const uint32_t q_st = sQ + s * L::kQ, do_st = sdO + s * L::kQ, ds_buf = sdS + s * L::kS;
        mbar_wait(full + 8 * s, (n >> 1) & 1);
        // GEMM operand descriptors: each is its operand's per-step base descriptor plus one add (desc_add).
        // The K/V base addresses go through opaque_u32, so they are re-derived per step: NVVM would hoist
        // the loop-invariant K/V descriptors (16 at D=64, 24 at D=128) out of the step loop, and held across
        // it they spilled 28 bytes at D=128.
        const uint64_t k_d = smem_desc(opaque_u32(k_wg), 16, 1024);
        const uint64_t v_d = smem_desc(opaque_u32(v_wg), 16, 1024);
        const uint64_t kdq_d = smem_desc(opaque_u32(sK), kBN * 128, 1024);
        const uint64_t q_d = smem_desc(q_st, 16, 1024), do_d = smem_desc(do_st, 16, 1024);

        float sc[QS / 2], dp[QS / 2];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t ka = (kk >> 2) * (kBN * 128) + (kk & 3) * 32, kb = (kk >> 2) * (QS * 128) + (kk & 3) * 32;
          wgmma_ss<T, QS>(sc, desc_add(k_d, ka), desc_add(q_d, kb), kk > 0 ? 1 : 0);
        }
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t ka = (kk >> 2) * (kBN * 128) + (kk & 3) * 32, kb = (kk >> 2) * (QS * 128) + (kk & 3) * 32;
          wgmma_ss<T, QS>(dp, desc_add(v_d, ka), desc_add(do_d, kb), kk > 0 ? 1 : 0);
        }
        wg_commit();
        // Step column c: lse * log2(e) at stats[c % 64 + kStatsTileFloats (c / 64)], delta kStatsBoxRows
        // floats later (per plan tile); stats starts q0 & 3 floats into the stage (the boxes' alignment).
        const float* stats = stats_all + s * (L::kStats / 4) + (q0 & 3);
        // Masked steps: the visible queries of each of this thread's two keys form one interval of step
        // columns [vlo, vhi] (slice bounds and diagonal band intersected once per step), so the
        // per-element test is two compares. The element loops are instantiated with and without it (a
        // runtime test inside them made the compiler branch per element and serialize on each MUFU result).
        int vlo[2] = {0, 0}, vhi[2] = {-1, -1};
        if (masked) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int j = key_lo + 8 * r;
            if (j >= cut.k_start && j < cut.k_end) {
              vlo[r] = max(cut.q_start, j - cut.hi) - q0;
              vhi[r] = min(cut.q_end - 1, j - cut.lo) - q0;
            }
          }
        }
        auto visible = [&](int c, int r) { return c >= vlo[r] && c <= vhi[r]; };
        if constexpr (QS == 128) {
          // The exponentials of P^T run while the dP^T GEMM is still in flight.
          wg_wait<1>();
          reg_fence(sc);
          auto p_loop = [&](auto mask_tag) {
            constexpr bool kMask = decltype(mask_tag)::value;
#pragma unroll
            for (int j = 0; j < QS / 8; ++j) {
              const int col = j * 8 + (lane & 3) * 2;
              const float* l2 = stats + (col & (kTileQ - 1)) + (j >> 3) * kStatsTileFloats;  // 4-byte aligned only
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const float pr = exp2_ftz(fmaf(sc[4 * j + e], p.scale_log2, -l2[e & 1]));
                sc[4 * j + e] = !kMask || visible(col + (e & 1), e >> 1) ? pr : 0.f;
              }
            }
          };
          if (masked)
            p_loop(std::true_type{});
          else
            p_loop(std::false_type{});
          wg_wait<0>();
          reg_fence(dp);
#pragma unroll
          for (int j = 0; j < QS / 8; ++j) {
            const int col = j * 8 + (lane & 3) * 2;
            const float* d2 = stats + (col & (kTileQ - 1)) + (j >> 3) * kStatsTileFloats + kStatsBoxRows;
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * j + e] = sc[4 * j + e] * (dp[4 * j + e] - d2[e & 1]);
          }
        } else {
          // One wait and one fused loop (the split costs spills at D=128).
          wg_wait<0>();
          reg_fence(sc);
          reg_fence(dp);
          auto pds_loop = [&](auto mask_tag) {
            constexpr bool kMask = decltype(mask_tag)::value;
#pragma unroll
            for (int j = 0; j < QS / 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int col = j * 8 + (lane & 3) * 2 + (e & 1);
                float pr = exp2_ftz(fmaf(sc[4 * j + e], p.scale_log2, -stats[col]));
                if (kMask && !visible(col, e >> 1)) pr = 0.f;
                sc[4 * j + e] = pr;
                dp[4 * j + e] = pr * (dp[4 * j + e] - stats[col + kStatsBoxRows]);
              }
          };
          if (masked)
            pds_loop(std::true_type{});
          else
            pds_loop(std::false_type{});
        }
        uint32_t pa[QS / 16][4], da[QS / 16][4];
        acc_to_a_frags<T>(pa, sc, da, dp);
        // dS^T (this warpgroup's 64 keys x QS queries) into rows [64 cw, 64 cw + 64) of the 128-key
        // buffer, in the swizzled layout the dQ GEMM reads M-major (64-query column blocks).
        {
          // stmatrix: lanes 8m..8m+7 address the rows of 8x8 matrix m = (row half m & 1, column half m >> 1).
          const int r = cw * 64 + wq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
          for (int kk = 0; kk < QS / 16; ++kk)
            stsm_x4(ds_buf + sw_off<kBN>(r, kk * 16 + (lane >> 4) * 8), da[kk][0], da[kk][1], da[kk][2], da[kk][3]);
        }
        fence_async_smem();  // ordinary stores, read by both warpgroups' wgmma through the async proxy
        named_bar_arrive(kBarDs + 2 * cw + s, 256);  // this half of dS^T is written

        // dV and dK need only this warpgroup's P^T and dS^T (registers): issued before waiting for the
        // other half of dS^T, they keep the tensor cores busy while the other warpgroup is still in its
        // element-wise work.
        reg_fence(dv);
        reg_fence(dk);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < QS / 16; ++kk) {
          wgmma_rs_tb<T, D>(dv, pa[kk], smem_desc(do_st + kk * 16 * 128, QS * 128, 1024));
          wgmma_rs_tb<T, D>(dk, da[kk], smem_desc(q_st + kk * 16 * 128, QS * 128, 1024));
        }
        wg_commit();
        named_bar_sync(kBarDs + 2 * (1 - cw) + s, 256);  // the other half is written

        // dQ job: 64 queries (query block mb of the step) x 64 columns (column block job of D) over all
        // 128 keys. At QS = 128 it also runs for a second half outside the run (dS = 0 there; the writer
        // skips the reduction): branching around it cost v7 ~280 bytes of spills.
        float dq[32];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
          wgmma_ss_tt<T, 64>(dq, smem_desc(ds_buf + mb * (kBN * 128) + kk * 16 * 128, kBN * 128, 1024),
                             desc_add(kdq_d, job * (kBN * 128) + kk * 16 * 128), kk > 0 ? 1 : 0);
        wg_commit();
        wg_wait<0>();
        reg_fence(dk);
        reg_fence_u(da);
        mbar_arrive(empty + 8 * s);  // Q, dO and the stats of stage s are no longer read
        reg_fence(dv);
        reg_fence_u(pa);
        reg_fence(dq);

        // dQ -> the two swizzled boxes of this warpgroup's staging buffer, then to writer warp cw. Fragment
        // j (columns 8 j + 2 (lane & 3) + {0, 1}; rows r0, r0 + 8) lies in box j >> 2 at 16-byte chunk
        // 2 (j & 3) + ((lane >> 1) & 1), swizzled by r0 & 7 = lane >> 2. Stored as is, a half-warp's 4 rows
        // would cover 2 chunk pairs (rows r, r ^ 1 share one): 2-way bank conflicts. Lanes of odd rows
        // store fragment j ^ 2 in instruction j instead (a select per value), which puts the 4 rows on 4
        // chunk pairs: conflict-free. In instruction j the lane's chunk is then
        // 2 (j & 3) ^ (4 (r0 & 1) ^ ((lane >> 1) & 1) ^ (r0 & 7)), so its offset is one per-lane base ^ 32 (j & 3).
        named_bar_sync(kBarDqEmpty + cw, 160);
        unsigned char* st = smem + (dq_stage - base);
        {
          const int r0 = wq * 16 + (lane >> 2);
          const bool odd = (r0 & 1) != 0;
          const uint32_t lane_off =
              r0 * 128 + ((4 * (r0 & 1) ^ ((lane >> 1) & 1) ^ (r0 & 7)) << 4) + (lane & 1) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int js = j ^ 2;
            const uint32_t off = (lane_off ^ ((j & 3) << 5)) + (j >> 2) * kDqBoxBytes;
            *reinterpret_cast<float2*>(st + off) =
                make_float2(odd ? dq[4 * js] : dq[4 * j], odd ? dq[4 * js + 1] : dq[4 * j + 1]);
            *reinterpret_cast<float2*>(st + off + 8 * 128) =
                make_float2(odd ? dq[4 * js + 2] : dq[4 * j + 2], odd ? dq[4 * js + 3] : dq[4 * j + 3]);
          }
        }
        __syncwarp();
        fence_async_smem();
        named_bar_sync(kBarDqFull + cw, 160);  // (a sync, not an arrive: see kBarDqFull)
      }
    }
  }
  // Epilogue: both warpgroups' last dQ GEMMs (which read all of K) are done before K/V are reused as
  // staging for dK (times the softmax scale) and dV.
  named_bar_sync(kBarEpilogue, 256);
  store_dkdv_warp_rows<T, D, kBN>(smem + L::sK, smem + L::sV, cw * 64 + wq * 16, dk, dv, p.scale,
                                  static_cast<T*>(p.dk) + hk * p.dk_sh, p.dk_st, static_cast<T*>(p.dv) + hk * p.dv_sh,
                                  p.dv_st, c0, it.row_end);
}

// The preprocessing kernel's per-head stats (BwdParams::stats) as a 3-D fp32 tensor (row, lse2 or delta,
// head); box: kStatsBoxRows rows (one 64-query plan tile + the alignment slack) x both x 1 head, no swizzle.
CUtensorMap make_stats_map(const float* stats, int heads, int rows) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(rows), 2, static_cast<cuuint64_t>(heads)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(rows) * 4, static_cast<cuuint64_t>(rows) * 8};
  const cuuint32_t box[3] = {kStatsBoxRows, 2, 1};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r =
      cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(stats), dims, strides, box,
                             estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("ffa backward (dQ writer): stats tensor map failed, code " + std::to_string(r));
  return map;
}

// The fp32 dQ accumulator (Tq, Hq, D) as a 3-D tensor (column, head, row); box: 32 columns (128 bytes) x
// 1 head x 64 rows, 128B swizzle (a consumer's staging box). Only reduced into: rows of a box past num_q
// are clipped by the bounds.
CUtensorMap make_dq_accum_map(float* dq_accum, int heads, int rows, int head_dim) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(rows > 0 ? rows : 1)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_dim) * 4,
                                 static_cast<cuuint64_t>(heads) * static_cast<cuuint64_t>(head_dim) * 4};
  const cuuint32_t box[3] = {32, 1, 64};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r =
      cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, dq_accum, dims, strides, box, estr,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("ffa backward (dQ writer): dQ accumulator tensor map failed, code " + std::to_string(r));
  return map;
}

template <typename T, int D>
void launch_t(TypeTag<T>, DimTag<D>, int dtype, const BwdParams& p, cudaStream_t stream) {
  constexpr int QS = queries_per_step<D>();
  const int64_t grid = static_cast<int64_t>(p.k_side.num_items) * p.heads_kv;
  if (grid == 0) return;
  const CUtensorMap tq = make_tensor_map(p.q, dtype, p.num_q, p.heads_q, p.q_st, p.q_sh, D, QS);
  const CUtensorMap tdo = make_tensor_map(p.dout, dtype, p.num_q, p.heads_q, p.do_st, p.do_sh, D, QS);
  const CUtensorMap tk = make_tensor_map(p.k, dtype, p.num_k, p.heads_kv, p.k_st, p.k_sh, D, kBN);
  const CUtensorMap tv = make_tensor_map(p.v, dtype, p.num_k, p.heads_kv, p.v_st, p.v_sh, D, kBN);
  const CUtensorMap ts = make_stats_map(p.stats, p.heads_q, p.stats_rows);
  const CUtensorMap tdq = make_dq_accum_map(p.dq_accum, p.heads_q, p.num_q, D);
  constexpr int kSmem = Smem<D>::total;
  launch_checked("ffa backward (dQ writer)", bwd_dqwriter_kernel<T, D>, grid, kThreads, kSmem, stream, p, tq, tdo, tk,
                 tv, ts, tdq);
}

}  // namespace

void launch_dkdv_dqwriter(int dtype, int head_dim, const BwdParams& p, cudaStream_t stream) {
  dispatch_dtype_dim("ffa backward (dQ writer)", dtype, head_dim,
                     [&](auto t, auto d) { launch_t(t, d, dtype, p, stream); });
}

}  // namespace detail
}  // namespace ffa
