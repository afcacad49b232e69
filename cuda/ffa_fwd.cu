// Forward pass, FlashAttention-2 style on mma.sync: one CTA per (q-side work item, query head), 8 warps
// of 16 query rows each (128-row q tile), 64-key tiles double-buffered through cp.async. The item's
// runs list its k tiles; mask code runs only on runs marked masked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

// Walks an item's tiles across its runs: (run index, tile index in run).
struct TileCursor {
  int run, t;
};

__device__ __forceinline__ TileCursor cursor_next(const Run* runs, TileCursor c) {
  if (c.t + 1 < runs[c.run].tiles * (kPlanTileQCols / kFwdTileK)) return {c.run, c.t + 1};
  return {c.run + 1, 0};
}

template <typename T, int D>
__global__ void __launch_bounds__(kFwdThreads, 1) fwd_kernel(const FwdParams p) {
  constexpr int BM = kFwdTileQ, BN = kFwdTileK;
  constexpr int kTileQBytes = BM * D * 2, kTileKBytes = BN * D * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* sQ = smem;
  const uint32_t sQa = smem_u32(sQ);
  const uint32_t sKa = sQa + kTileQBytes;          // 2 stages
  const uint32_t sVa = sKa + 2 * kTileKBytes;      // 2 stages

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const QWorkTile wt = q_work_tile(p.side, p.heads_q, p.group, blockIdx.x);
  const Item it = wt.it;
  const int h = wt.h, hk = wt.hk;
  const Run* runs = p.side.runs;

  const T* qg = static_cast<const T*>(p.q) + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + hk * p.v_sh;

  load_tile_async<BM, D, kFwdThreads>(sQa, qg, p.q_st, it.row_begin, p.num_q, tid);
  cp_async_commit();

  TileCursor cur{it.run_begin, 0};
  auto issue_kv = [&](TileCursor c, int stage) {
    const int c0 = runs[c.run].begin + c.t * BN;
    load_tile_async<BN, D, kFwdThreads>(sKa + stage * kTileKBytes, kg, p.k_st, c0, p.num_k, tid);
    load_tile_async<BN, D, kFwdThreads>(sVa + stage * kTileKBytes, vg, p.v_st, c0, p.num_k, tid);
    cp_async_commit();
  };
  if (cur.run < it.run_end) issue_kv(cur, 0);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];

  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldsm_x4(qf[kk], sQa + tile_off<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 16 + (lane >> 4) * 8));

  const int row_lo = it.row_begin + warp * 16 + (lane >> 2);  // this thread's rows: row_lo, row_lo + 8
  int stage = 0;
  while (cur.run < it.run_end) {
    cp_async_wait<0>();
    __syncthreads();
    const Run run = runs[cur.run];
    const int c0 = run.begin + cur.t * BN;
    const TileCursor nxt = cursor_next(runs, cur);
    if (nxt.run < it.run_end) issue_kv(nxt, stage ^ 1);
    const uint32_t sK = sKa + stage * kTileKBytes, sV = sVa + stage * kTileKBytes;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sK + tile_off<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
        mma16816<T>(s[2 * np], qf[kk], b[0], b[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
    if (run.masked) mask_scores<BN>(s, p.side.cuts[run.cut], row_lo, c0, lane);
    // Online softmax (log2 domain); a row that has seen no key yet keeps m = -inf and p = 0.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx * p.scale_log2);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[r] - m_use);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        const float p0 = exp2f(fmaf(s[n][2 * r], p.scale_log2, -m_use));
        const float p1 = exp2f(fmaf(s[n][2 * r + 1], p.scale_log2, -m_use));
        s[n][2 * r] = p0;
        s[n][2 * r + 1] = p1;
        l[r] += p0 + p1;
      }
    }
    // O += P V, P straight from the S accumulators (C layout of two n-tiles = A layout of one k-step).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, sV + tile_off<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8));
        mma16816<T>(o[2 * dp], a, b[0], b[1]);
        mma16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    cur = nxt;
    stage ^= 1;
  }

  // Epilogue: normalize, stage this warp's rows in its own part of the Q tile, 16-byte stores.
  T* og = static_cast<T*>(p.out) + h * p.o_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_row_sum(l[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int row = warp * 16 + (lane >> 2) + r * 8, col = n * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(sQ + tile_off<D>(row, col)) = pack2<T>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    const int row = row_lo + r * 8;
    if ((lane & 3) == 0 && row < it.row_end)
      p.lse[row * p.lse_st + h * p.lse_sh] = row_lse(m[r], sum);
  }
  __syncwarp();
  store_tile_warp<16, D>(sQ, warp * 16, og, p.o_st, it.row_begin + warp * 16, it.row_end, lane);
}

template <typename T, int D>
void launch_fwd_t(TypeTag<T>, DimTag<D>, const FwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = (kFwdTileQ + 4 * kFwdTileK) * D * 2;
  const int64_t grid = static_cast<int64_t>(p.side.num_items) * p.heads_q;
  if (grid == 0) return;
  launch_checked("ffa forward", fwd_kernel<T, D>, grid, kFwdThreads, kSmem, stream, p);
}

}  // namespace

void launch_forward(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream) {
  dispatch_dtype_dim("ffa forward", dtype, head_dim, [&](auto t, auto d) { launch_fwd_t(t, d, p, stream); });
}

}  // namespace detail
}  // namespace ffa
