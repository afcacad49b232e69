// dK/dV (and atomic dQ) pass of the backward on Hopper wgmma (backward kernel 1; the deterministic mode's
// dK/dV pass): one warpgroup per CTA owns a 64-key tile (half of a 128-key plan item) of one kv head,
// loops over the query heads of its GQA group and over the item's 64-query tiles.
// All operands sit in 128B-swizzled shared memory loaded by cp.async (two stages for Q, dO):
//   S^T  = K Q^T          SS-wgmma (both K-major)          -> P^T = exp2(S^T * scale * log2e - lse)
//   dP^T = V dO^T         SS-wgmma                         -> dS^T = P^T * (dP^T - delta)
//   dV  += P^T dO         RS-wgmma (P^T from registers, dO N-major)
//   dK  += dS^T Q         RS-wgmma
//   dQ   = dS K           SS-wgmma, dS^T staged in shared memory read M-major, K N-major; fp32 atomics
// dK, dV stay in fp32 registers across the whole item (slices sharing keys and GQA heads add there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_hopper.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"
#include "cuda/ffa_wgmma.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBN = kBwdTileK, kBM = kBwdTileQ, kThreads = 128;
static_assert(kBN == 64 && kBM == 64, "one warpgroup: 64 keys x 64 queries");

template <typename T, int D, bool kAtomicDq>
__global__ void __launch_bounds__(kThreads, 1) dkdv_wgmma_kernel(const BwdParams p) {
  constexpr uint32_t kTile = 64 * D * 2;  // one 64-row tile
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sK = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sK - raw);
  const uint32_t sV = sK + kTile, sQ = sV + kTile, sdO = sQ + 2 * kTile, sdS = sdO + 2 * kTile;
  float* sLse = reinterpret_cast<float*>(smem + (sdS - sK) + 64 * 64 * 2);  // [2][64]
  float* sDelta = sLse + 2 * kBM;                                         // [2][64]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Two CTAs per plan item (kPlanTileK = 128 keys): this one owns the 64-key half blockIdx.x & 1.
  const int item_idx = (blockIdx.x >> 1) / p.heads_kv;
  const int hk = (blockIdx.x >> 1) % p.heads_kv;
  const Item it = p.k_side.items[item_idx];
  const Run* runs = p.k_side.runs;
  const int c0 = it.row_begin + (blockIdx.x & 1) * kBN;
  const int row_end = min(it.row_end, c0 + kBN);
  if (c0 >= row_end) return;  // a short item has no second half

  load_sw_tile_async<64, D, kThreads>(sK, static_cast<const T*>(p.k) + hk * p.k_sh, p.k_st, c0, p.num_k, tid);
  load_sw_tile_async<64, D, kThreads>(sV, static_cast<const T*>(p.v) + hk * p.v_sh, p.v_st, c0, p.num_k, tid);
  cp_async_commit();

  const bool has_runs = it.run_begin < it.run_end;
  auto issue = [&](GroupRunCursor c, int stage) {
    const int h = hk * p.group + c.g;
    const int q0 = runs[c.run].begin + c.t * kBM;
    load_sw_tile_async<64, D, kThreads>(sQ + stage * kTile, static_cast<const T*>(p.q) + h * p.q_sh, p.q_st, q0,
                                        p.num_q, tid);
    load_sw_tile_async<64, D, kThreads>(sdO + stage * kTile, static_cast<const T*>(p.dout) + h * p.do_sh, p.do_st,
                                        q0, p.num_q, tid);
    cp_async_commit();
    load_bwd_row_stats<kBM>(p, h, q0, sLse + stage * kBM, sDelta + stage * kBM, tid);
  };

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) dk[n] = dv[n] = 0.f;

  GroupRunCursor cur{0, it.run_begin, 0};
  if (has_runs) issue(cur, 0);
  int stage = 0;
  const int key_lo = c0 + warp * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  while (has_runs && cur.g < p.group) {
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    const Run run = runs[cur.run];
    const int q0 = run.begin + cur.t * kBM;
    const int h = hk * p.group + cur.g;
    const GroupRunCursor nxt = group_run_next(runs, it, cur);
    if (nxt.g < p.group) issue(nxt, stage ^ 1);
    const uint32_t q_st = sQ + stage * kTile, do_st = sdO + stage * kTile;
    const float* lse2 = sLse + stage * kBM;
    const float* dlt = sDelta + stage * kBM;

    float s[kBM / 2], dp[kBM / 2];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk >> 2) * (64 * 128) + (kk & 3) * 32;
      wgmma_ss<T, kBM>(s, smem_desc(sK + off, 16, 1024), smem_desc(q_st + off, 16, 1024), kk > 0 ? 1 : 0);
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk >> 2) * (64 * 128) + (kk & 3) * 32;
      wgmma_ss<T, kBM>(dp, smem_desc(sV + off, 16, 1024), smem_desc(do_st + off, 16, 1024), kk > 0 ? 1 : 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(s);
    reg_fence(dp);

    const bool masked = run.masked;
    CutSlice cut{};
    if (masked) cut = p.k_side.cuts[run.cut];
    bwd_p_ds_transposed<kBM>(s, dp, p.scale_log2, lse2, dlt, masked, cut, q0, key_lo, lane);
    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
    acc_to_a_frags<T>(pa, s, da, dp);
    if (kAtomicDq) {
      // dS^T (keys x queries) to shared memory for the dQ GEMM, in the swizzled layout wgmma reads.
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        const int r = warp * 16 + (lane >> 2), cq = kk * 16 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(smem + (sdS - sK) + sw_off<64>(r, cq)) = da[kk][0];
        *reinterpret_cast<uint32_t*>(smem + (sdS - sK) + sw_off<64>(r + 8, cq)) = da[kk][1];
        *reinterpret_cast<uint32_t*>(smem + (sdS - sK) + sw_off<64>(r, cq + 8)) = da[kk][2];
        *reinterpret_cast<uint32_t*>(smem + (sdS - sK) + sw_off<64>(r + 8, cq + 8)) = da[kk][3];
      }
    }
    reg_fence(dv);
    reg_fence(dk);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      // dO and Q are [query][d]: as B (queries x d) they are N-major; 16 queries = two 8-row groups.
      wgmma_rs_tb<T, D>(dv, pa[kk], smem_desc(do_st + kk * 16 * 128, 64 * 128, 1024));
      wgmma_rs_tb<T, D>(dk, da[kk], smem_desc(q_st + kk * 16 * 128, 64 * 128, 1024));
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(dv);
    reg_fence(dk);
    reg_fence_u(pa);
    reg_fence_u(da);
    if (kAtomicDq) {
      fence_async_smem();  // dS^T was written with ordinary stores; wgmma reads it through the async proxy
      __syncthreads();
      // dQ (64 queries x D) = dS K: A = dS^T read M-major (queries contiguous), B = K read N-major.
      float dq[D / 2];
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_ss_tt<T, D>(dq, smem_desc(sdS + kk * 16 * 128, 64 * 128, 1024),
                          smem_desc(sK + kk * 16 * 128, 64 * 128, 1024), kk > 0 ? 1 : 0);
      wg_commit();
      wg_wait<0>();
      reg_fence(dq);
      const int qrow = q0 + warp * 16 + (lane >> 2);
      float* dqa = p.dq_accum + (static_cast<int64_t>(qrow) * p.heads_q + h) * D;
      const int64_t row8 = static_cast<int64_t>(8) * p.heads_q * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + (lane & 3) * 2;
        if (qrow < p.num_q) atomicAdd(reinterpret_cast<float2*>(dqa + col), make_float2(dq[4 * j], dq[4 * j + 1]));
        if (qrow + 8 < p.num_q)
          atomicAdd(reinterpret_cast<float2*>(dqa + row8 + col), make_float2(dq[4 * j + 2], dq[4 * j + 3]));
      }
    }
    cur = nxt;
    stage ^= 1;
  }

  // Epilogue: dK (times the softmax scale) and dV through this warp's rows of the K / V tiles.
  cp_async_wait<0>();
  __syncthreads();
  store_dkdv_warp_rows<T, D, 64>(smem, smem + kTile, warp * 16, dk, dv, p.scale, static_cast<T*>(p.dk) + hk * p.dk_sh,
                                 p.dk_st, static_cast<T*>(p.dv) + hk * p.dv_sh, p.dv_st, c0, row_end);
}

template <typename T, int D>
void launch_t(TypeTag<T>, DimTag<D>, bool atomic_dq, const BwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = 6 * 64 * D * 2 + 64 * 64 * 2 + 4 * 64 * 4 + 1024;
  static_assert(2 * kBN == kPlanTileK, "two CTAs per plan item");
  const int64_t grid = 2 * static_cast<int64_t>(p.k_side.num_items) * p.heads_kv;
  if (grid == 0) return;
  auto kernel = atomic_dq ? dkdv_wgmma_kernel<T, D, true> : dkdv_wgmma_kernel<T, D, false>;
  launch_checked("ffa backward (wgmma)", kernel, grid, kThreads, kSmem, stream, p);
}

}  // namespace

void launch_dkdv_wgmma(int dtype, int head_dim, bool atomic_dq, const BwdParams& p, cudaStream_t stream) {
  dispatch_dtype_dim("ffa backward (wgmma)", dtype, head_dim,
                     [&](auto t, auto d) { launch_t(t, d, atomic_dq, p, stream); });
}

}  // namespace detail
}  // namespace ffa
