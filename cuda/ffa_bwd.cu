// Backward pass, FlashAttention-2 style on mma.sync.
//  1. preprocess: delta = rowsum(dout * out) in fp32 (and zero the fp32 dQ accumulator).
//  2. dkdv_kernel: one CTA per (half of a k-side work item, kv head): 4 warps own 16 keys each of a
//     64-key tile, loop over the query heads of the GQA group and over the item's 64-query tiles, and
//     keep dK, dV in fp32 registers (so GQA heads and several slices sharing keys add up there, in a fixed order).
//     In the default mode each q tile's dQ contribution dS K goes to an fp32 accumulator with atomics.
//  3. deterministic mode: dq_kernel recomputes P and dS per (q-side item, head) and accumulates dQ in
//     registers, no atomics; otherwise a small kernel converts the accumulator (times the scale).
// launch_backward runs the dK/dV pass of BackwardArgs::kernel: 5 (cuda/ffa_bwd_dqwriter.cu; kernel 1 when
// it cannot run: deterministic mode, no queries or keys), 1 (cuda/ffa_bwd_wgmma.cu) or 2 (dkdv_kernel here).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half x) {
  return __half2float(x);
}

// One thread per 8 elements of a (row, head): delta = sum(dout * out); also zeroes dq_accum. Kernel 5
// reads per-head stats instead (p.stats set): the (row, head) pairs are then walked head-major over
// p.stats_rows rows per head, and lse * log2(e) (+inf for rows with no key) and delta go to p.stats
// (rows past num_q: +inf and 0, so a step reaching past the end needs no test).
template <typename T, int D>
__global__ void preprocess_kernel(const BwdParams p, bool zero_accum) {
  constexpr int kThreadsPerRow = D / 8;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rowhead = gid / kThreadsPerRow;
  const int c = static_cast<int>(gid % kThreadsPerRow) * 8;
  const bool head_major = p.stats != nullptr;
  const int64_t rows = head_major ? p.stats_rows : p.num_q;
  const bool valid = rowhead < rows * p.heads_q;
  int64_t row = 0;
  int h = 0;
  if (valid) {
    row = head_major ? rowhead % rows : rowhead / p.heads_q;
    h = static_cast<int>(head_major ? rowhead / rows : rowhead % p.heads_q);
  }
  const bool real = valid && row < p.num_q;
  float acc = 0.f;
  if (real) {
    const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + row * p.do_st + h * p.do_sh + c);
    const uint4 b = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + row * p.o_st + h * p.o_sh + c);
    const T* ea = reinterpret_cast<const T*>(&a);
    const T* eb = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_f<T>(ea[e]) * to_f<T>(eb[e]);
    if (zero_accum) {
      float4* dst = reinterpret_cast<float4*>(p.dq_accum + (row * p.heads_q + h) * D + c);
      dst[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      dst[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int off = 1; off < kThreadsPerRow; off <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (!valid || c != 0) return;
  if (head_major) {
    float lse2 = INFINITY;  // empty rows and rows past the end: P = 0, never NaN
    if (real) {
      const float lse = p.lse[row * p.lse_st + h * p.lse_sh];
      lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
    float* st = p.stats + static_cast<int64_t>(h) * 2 * rows;
    st[row] = lse2;
    st[rows + row] = acc;
  } else {
    p.delta[row * p.heads_q + h] = acc;
  }
}

template <typename T, int D>
__global__ void convert_dq_kernel(const BwdParams p) {
  constexpr int kThreadsPerRow = D / 8;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rowhead = gid / kThreadsPerRow;
  if (rowhead >= static_cast<int64_t>(p.num_q) * p.heads_q) return;
  const int c = static_cast<int>(gid % kThreadsPerRow) * 8;
  const int64_t row = rowhead / p.heads_q;
  const int h = static_cast<int>(rowhead % p.heads_q);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + rowhead * D + c);
  const float4 x = src[0], y = src[1];
  uint4 outv;
  outv.x = pack2<T>(x.x * p.scale, x.y * p.scale);
  outv.y = pack2<T>(x.z * p.scale, x.w * p.scale);
  outv.z = pack2<T>(y.x * p.scale, y.y * p.scale);
  outv.w = pack2<T>(y.z * p.scale, y.w * p.scale);
  *reinterpret_cast<uint4*>(static_cast<T*>(p.dq) + row * p.dq_st + h * p.dq_sh + c) = outv;
}

template <typename T, int D, bool kAtomicDq>
__global__ void __launch_bounds__(kBwdThreads, 1) dkdv_kernel(const BwdParams p) {
  constexpr int BN = kBwdTileK, BM = kBwdTileQ;  // keys per CTA, queries per step
  constexpr int kTileBytes = 64 * D * 2;
  static_assert(BN == 64 && BM == 64, "tile bytes assume 64-row tiles");
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* sK = smem;
  unsigned char* sV = smem + kTileBytes;
  const uint32_t sKa = smem_u32(sK), sVa = smem_u32(sV);
  const uint32_t sQa = sKa + 2 * kTileBytes;      // 2 stages
  const uint32_t sdOa = sQa + 2 * kTileBytes;     // 2 stages
  const uint32_t sdSa = sdOa + 2 * kTileBytes;    // 64 keys x 64 queries
  unsigned char* sdS = smem + 6 * kTileBytes;
  float* sLse = reinterpret_cast<float*>(smem + 6 * kTileBytes + BN * BM * 2);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                                                 // [2][BM]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Two CTAs per plan item (kPlanTileK = 128 keys): this one owns the 64-key half blockIdx.x & 1.
  static_assert(2 * BN == kPlanTileK, "two CTAs per plan item");
  const int item_idx = (blockIdx.x >> 1) / p.heads_kv;
  const int hk = (blockIdx.x >> 1) % p.heads_kv;
  const Item it = p.k_side.items[item_idx];
  const Run* runs = p.k_side.runs;
  const int c0 = it.row_begin + (blockIdx.x & 1) * BN;  // first key of this CTA
  const int row_end = min(it.row_end, c0 + BN);
  if (c0 >= row_end) return;  // a short item has no second half

  load_tile_async<BN, D, kBwdThreads>(sKa, static_cast<const T*>(p.k) + hk * p.k_sh, p.k_st, c0, p.num_k, tid);
  load_tile_async<BN, D, kBwdThreads>(sVa, static_cast<const T*>(p.v) + hk * p.v_sh, p.v_st, c0, p.num_k, tid);
  cp_async_commit();

  // Flattened walk over (query head of the group, run, q tile).
  const bool has_runs = it.run_begin < it.run_end;
  auto issue = [&](GroupRunCursor c, int stage) {
    const int h = hk * p.group + c.g;
    const int q0 = runs[c.run].begin + c.t * BM;
    load_tile_async<BM, D, kBwdThreads>(sQa + stage * kTileBytes, static_cast<const T*>(p.q) + h * p.q_sh, p.q_st,
                                        q0, p.num_q, tid);
    load_tile_async<BM, D, kBwdThreads>(sdOa + stage * kTileBytes, static_cast<const T*>(p.dout) + h * p.do_sh,
                                        p.do_st, q0, p.num_q, tid);
    cp_async_commit();
    load_bwd_row_stats<BM>(p, h, q0, sLse + stage * BM, sDelta + stage * BM, tid);
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  GroupRunCursor cur{0, it.run_begin, 0};
  if (has_runs) issue(cur, 0);
  int stage = 0;
  const int key_lo = c0 + warp * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  while (has_runs && cur.g < p.group) {
    cp_async_wait<0>();
    __syncthreads();
    const Run run = runs[cur.run];
    const int q0 = run.begin + cur.t * BM;
    const int h = hk * p.group + cur.g;
    const GroupRunCursor nxt = group_run_next(runs, it, cur);
    if (nxt.g < p.group) issue(nxt, stage ^ 1);
    const uint32_t sQ = sQa + stage * kTileBytes, sdO = sdOa + stage * kTileBytes;
    const float* lse2 = sLse + stage * BM;
    const float* dlt = sDelta + stage * BM;

    // S^T = K Q^T (this warp's 16 keys x 64 queries) and dP^T = V dO^T.
    float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      const uint32_t aoff = tile_off<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8);
      ldsm_x4(ak, sKa + aoff);
      ldsm_x4(av, sVa + aoff);
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        const uint32_t boff = tile_off<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8);
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, sQ + boff);
        ldsm_x4(bo, sdO + boff);
        mma16816<T>(s[2 * np], ak, bq[0], bq[1]);
        mma16816<T>(s[2 * np + 1], ak, bq[2], bq[3]);
        mma16816<T>(dp[2 * np], av, bo[0], bo[1]);
        mma16816<T>(dp[2 * np + 1], av, bo[2], bo[3]);
      }
    }
    const bool masked = run.masked;
    CutSlice cut{};
    if (masked) cut = p.k_side.cuts[run.cut];
    // P^T and dS^T = P^T * (dP^T - delta); s becomes P, dp becomes dS.
    bwd_p_ds_transposed<BM>(s, dp, p.scale_log2, lse2, dlt, masked, cut, q0, key_lo, lane);
    // dV += P^T dO and dK += dS^T Q (A from registers, B = dO / Q tiles read transposed).
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      const uint32_t ap[4] = {pack2<T>(s[2 * kq][0], s[2 * kq][1]), pack2<T>(s[2 * kq][2], s[2 * kq][3]),
                              pack2<T>(s[2 * kq + 1][0], s[2 * kq + 1][1]),
                              pack2<T>(s[2 * kq + 1][2], s[2 * kq + 1][3])};
      const uint32_t ads[4] = {pack2<T>(dp[2 * kq][0], dp[2 * kq][1]), pack2<T>(dp[2 * kq][2], dp[2 * kq][3]),
                               pack2<T>(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                               pack2<T>(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
      if (kAtomicDq) {
        // dS^T to shared memory (keys x queries) for the dQ product below.
        const int r = warp * 16 + (lane >> 2), cq = kq * 16 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(sdS + tile_off<BM>(r, cq)) = ads[0];
        *reinterpret_cast<uint32_t*>(sdS + tile_off<BM>(r + 8, cq)) = ads[1];
        *reinterpret_cast<uint32_t*>(sdS + tile_off<BM>(r, cq + 8)) = ads[2];
        *reinterpret_cast<uint32_t*>(sdS + tile_off<BM>(r + 8, cq + 8)) = ads[3];
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        const uint32_t boff = tile_off<D>(kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dd * 16 + (lane >> 4) * 8);
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, sdO + boff);
        ldsm_x4_t(bq, sQ + boff);
        mma16816<T>(dv[2 * dd], ap, bo[0], bo[1]);
        mma16816<T>(dv[2 * dd + 1], ap, bo[2], bo[3]);
        mma16816<T>(dk[2 * dd], ads, bq[0], bq[1]);
        mma16816<T>(dk[2 * dd + 1], ads, bq[2], bq[3]);
      }
    }
    if (kAtomicDq) {
      __syncthreads();  // all of dS^T is in shared memory
      // dQ (64 queries x D) += dS K: warp w takes queries 16w..16w+15; A = dS read transposed.
      uint32_t a[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        ldsm_x4_t(a[kk], sdSa + tile_off<BM>(kk * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8));
      const int qrow = q0 + warp * 16 + (lane >> 2);
      float* dqa = p.dq_accum + (static_cast<int64_t>(qrow) * p.heads_q + h) * D;
      const int64_t row8 = static_cast<int64_t>(8) * p.heads_q * D;
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t b[4];
          ldsm_x4_t(b, sKa + tile_off<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dd * 16 + (lane >> 4) * 8));
          mma16816<T>(acc[0], a[kk], b[0], b[1]);
          mma16816<T>(acc[1], a[kk], b[2], b[3]);
        }
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) {
          const int col = dd * 16 + nn * 8 + (lane & 3) * 2;
          if (qrow < p.num_q) atomicAdd(reinterpret_cast<float2*>(dqa + col), make_float2(acc[nn][0], acc[nn][1]));
          if (qrow + 8 < p.num_q)
            atomicAdd(reinterpret_cast<float2*>(dqa + row8 + col), make_float2(acc[nn][2], acc[nn][3]));
        }
      }
    }
    cur = nxt;
    stage ^= 1;
  }

  // Epilogue: dK (times the softmax scale) and dV through this warp's rows of the K / V tiles.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int row = warp * 16 + (lane >> 2), col = n * 8 + (lane & 3) * 2;
    *reinterpret_cast<uint32_t*>(sK + tile_off<D>(row, col)) = pack2<T>(dk[n][0] * p.scale, dk[n][1] * p.scale);
    *reinterpret_cast<uint32_t*>(sK + tile_off<D>(row + 8, col)) = pack2<T>(dk[n][2] * p.scale, dk[n][3] * p.scale);
    *reinterpret_cast<uint32_t*>(sV + tile_off<D>(row, col)) = pack2<T>(dv[n][0], dv[n][1]);
    *reinterpret_cast<uint32_t*>(sV + tile_off<D>(row + 8, col)) = pack2<T>(dv[n][2], dv[n][3]);
  }
  __syncwarp();
  store_tile_warp<16, D>(sK, warp * 16, static_cast<T*>(p.dk) + hk * p.dk_sh, p.dk_st, c0 + warp * 16, row_end,
                         lane);
  store_tile_warp<16, D>(sV, warp * 16, static_cast<T*>(p.dv) + hk * p.dv_sh, p.dv_st, c0 + warp * 16, row_end,
                         lane);
}

// Deterministic dQ: one CTA per (q-side item, query head), 8 warps x 16 rows, 64-key tiles.
template <typename T, int D>
__global__ void __launch_bounds__(kFwdThreads, 1) dq_kernel(const BwdParams p) {
  constexpr int BM = kFwdTileQ, BN = kFwdTileK;
  constexpr int kTileQBytes = BM * D * 2, kTileKBytes = BN * D * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* sQ = smem;
  const uint32_t sQa = smem_u32(sQ);
  const uint32_t sdOa = sQa + kTileQBytes;
  const uint32_t sKa = sdOa + kTileQBytes;      // 2 stages
  const uint32_t sVa = sKa + 2 * kTileKBytes;   // 2 stages

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const QWorkTile wt = q_work_tile(p.q_side, p.heads_q, p.group, blockIdx.x);
  const Item it = wt.it;
  const int h = wt.h, hk = wt.hk;
  const Run* runs = p.q_side.runs;
  const T* kg = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + hk * p.v_sh;

  load_tile_async<BM, D, kFwdThreads>(sQa, static_cast<const T*>(p.q) + h * p.q_sh, p.q_st, it.row_begin, p.num_q, tid);
  load_tile_async<BM, D, kFwdThreads>(sdOa, static_cast<const T*>(p.dout) + h * p.do_sh, p.do_st, it.row_begin,
                                      p.num_q, tid);
  cp_async_commit();
  int run_i = it.run_begin, t = 0;
  auto issue_kv = [&](int ri, int ti, int stage) {
    const int k0 = runs[ri].begin + ti * BN;
    load_tile_async<BN, D, kFwdThreads>(sKa + stage * kTileKBytes, kg, p.k_st, k0, p.num_k, tid);
    load_tile_async<BN, D, kFwdThreads>(sVa + stage * kTileKBytes, vg, p.v_st, k0, p.num_k, tid);
    cp_async_commit();
  };
  if (run_i < it.run_end) issue_kv(run_i, 0, 0);

  const int row_lo = it.row_begin + warp * 16 + (lane >> 2);
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_lo + r * 8;
    lse2[r] = INFINITY;
    dlt[r] = 0.f;
    if (row < p.num_q) {
      const float lse = p.lse[row * p.lse_st + h * p.lse_sh];
      lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      dlt[r] = p.delta[static_cast<int64_t>(row) * p.heads_q + h];
    }
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  uint32_t qf[D / 16][4], df[D / 16][4];
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t off = tile_off<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8);
    ldsm_x4(qf[kk], sQa + off);
    ldsm_x4(df[kk], sdOa + off);
  }
  int stage = 0;
  while (run_i < it.run_end) {
    cp_async_wait<0>();
    __syncthreads();
    const Run run = runs[run_i];
    const int k0 = run.begin + t * BN;
    int nrun = run_i, nt = t + 1;
    if (nt >= run.tiles * (kPlanTileQCols / BN)) {
      nrun = run_i + 1;
      nt = 0;
    }
    if (nrun < it.run_end) issue_kv(nrun, nt, stage ^ 1);
    const uint32_t sK = sKa + stage * kTileKBytes, sV = sVa + stage * kTileKBytes;
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        const uint32_t off = tile_off<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8);
        uint32_t bk[4], bv[4];
        ldsm_x4(bk, sK + off);
        ldsm_x4(bv, sV + off);
        mma16816<T>(s[2 * np], qf[kk], bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], bk[2], bk[3]);
        mma16816<T>(dp[2 * np], df[kk], bv[0], bv[1]);
        mma16816<T>(dp[2 * np + 1], df[kk], bv[2], bv[3]);
      }
    }
    const bool masked = run.masked;
    CutSlice cut{};
    if (masked) cut = p.q_side.cuts[run.cut];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pr = exp2f(fmaf(s[n][e], p.scale_log2, -lse2[r]));
        if (masked && !cut_visible(cut, row_lo + r * 8, k0 + n * 8 + (lane & 3) * 2 + (e & 1))) pr = 0.f;
        dp[n][e] = pr * (dp[n][e] - dlt[r]);
      }
    // dQ += dS K (A from registers, K read transposed).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                             pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                             pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t b[4];
        ldsm_x4_t(b, sK + tile_off<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dd * 16 + (lane >> 4) * 8));
        mma16816<T>(dq[2 * dd], a, b[0], b[1]);
        mma16816<T>(dq[2 * dd + 1], a, b[2], b[3]);
      }
    }
    run_i = nrun;
    t = nt;
    stage ^= 1;
  }
  // Epilogue through this warp's rows of the Q tile (only this warp ever read them).
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int row = warp * 16 + (lane >> 2), col = n * 8 + (lane & 3) * 2;
    *reinterpret_cast<uint32_t*>(sQ + tile_off<D>(row, col)) = pack2<T>(dq[n][0] * p.scale, dq[n][1] * p.scale);
    *reinterpret_cast<uint32_t*>(sQ + tile_off<D>(row + 8, col)) = pack2<T>(dq[n][2] * p.scale, dq[n][3] * p.scale);
  }
  __syncwarp();
  store_tile_warp<16, D>(sQ, warp * 16, static_cast<T*>(p.dq) + h * p.dq_sh, p.dq_st, it.row_begin + warp * 16,
                         it.row_end, lane);
}

template <typename T, int D>
void launch_bwd_t(TypeTag<T>, DimTag<D>, int dtype, bool deterministic, int dkdv, const BwdParams& params,
                  cudaStream_t stream) {
  BwdParams p = params;
  const int64_t grid_kv = 2 * static_cast<int64_t>(p.k_side.num_items) * p.heads_kv;  // two CTAs per item
  // Kernel 5 needs queries, keys and the fp32 dQ accumulator (atomic mode); without them kernel 1 runs
  // (its dK = dV = 0 when there are no queries).
  const bool dqwriter_kernel = dkdv == 5 && grid_kv > 0 && !deterministic && p.num_q > 0 && p.num_k > 0 &&
                               p.dq_accum != nullptr;
  if (dqwriter_kernel) {  // per-head stats in the memory of delta (ffa_api.cu sizes it)
    p.stats = p.delta;
    p.stats_rows = static_cast<int>(stats_rows_for(p.num_q));
  }
  const int64_t rowheads = static_cast<int64_t>(p.num_q) * p.heads_q;
  const int64_t threads = rowheads * (D / 8);
  const int64_t pre_threads = (p.stats ? static_cast<int64_t>(p.stats_rows) * p.heads_q : rowheads) * (D / 8);
  if (pre_threads > 0)
    launch_checked("ffa backward preprocess", preprocess_kernel<T, D>, (pre_threads + 255) / 256, 256, 0, stream, p,
                   !deterministic);
  constexpr int kSmemKV = 6 * 64 * D * 2 + 64 * 64 * 2 + 4 * 64 * 4;
  if (dqwriter_kernel) {
    launch_dkdv_dqwriter(dtype, D, p, stream);
  } else if (grid_kv > 0 && dkdv != 2) {
    launch_dkdv_wgmma(dtype, D, !deterministic, p, stream);
  } else if (grid_kv > 0) {
    auto kernel = deterministic ? dkdv_kernel<T, D, false> : dkdv_kernel<T, D, true>;
    launch_checked("ffa backward dkdv", kernel, grid_kv, kBwdThreads, kSmemKV, stream, p);
  }
  if (deterministic) {
    constexpr int kSmemQ = (2 * kFwdTileQ + 4 * kFwdTileK) * D * 2;
    const int64_t grid_q = static_cast<int64_t>(p.q_side.num_items) * p.heads_q;
    if (grid_q > 0) launch_checked("ffa backward dq", dq_kernel<T, D>, grid_q, kFwdThreads, kSmemQ, stream, p);
  } else if (threads > 0) {
    launch_checked("ffa backward dq convert", convert_dq_kernel<T, D>, (threads + 255) / 256, 256, 0, stream, p);
  }
}

}  // namespace

void launch_backward(int dtype, int head_dim, bool deterministic, int dkdv, const BwdParams& p,
                     cudaStream_t stream) {
  dispatch_dtype_dim("ffa backward", dtype, head_dim,
                     [&](auto t, auto d) { launch_bwd_t(t, d, dtype, deterministic, dkdv, p, stream); });
}

}  // namespace detail
}  // namespace ffa
