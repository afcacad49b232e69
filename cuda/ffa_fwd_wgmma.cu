// Forward pass on Hopper warpgroup MMA (wgmma): one CTA per (q-side work item, query head), two
// warpgroups of 64 query rows each (128-row q tile), 128-key tiles double-buffered through cp.async
// into 128-byte-swizzled shared memory that wgmma reads directly (S = Q K^T with both operands in
// shared memory; O += P V with P from registers and V read "transposed", N-major).
// Intra-warpgroup overlap as in FlashAttention-3: the softmax of tile n runs while the P V GEMM of tile
// n-1 is in flight. Stepping stone towards the full FA3 design (TMA producer warp, mbarriers,
// ping-pong between warpgroups): loads are still issued by all threads one iteration ahead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"
#include "cuda/ffa_hopper.cuh"
#include "cuda/ffa_wgmma.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBM = 128, kBN = kPlanTileQCols, kThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_wgmma_kernel(const FwdParams p) {
  constexpr int kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  unsigned char* smem = smem_raw + (sQ - raw);
  const uint32_t sK = sQ + kQBytes, sV = sK + 2 * kKVBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  const QWorkTile wt = q_work_tile(p.side, p.heads_q, p.group, blockIdx.x);
  const Item it = wt.it;
  const int h = wt.h, hk = wt.hk;
  const Run* runs = p.side.runs;
  const T* kg = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + hk * p.v_sh;

  load_sw_tile_async<kBM, D, kThreads>(sQ, static_cast<const T*>(p.q) + h * p.q_sh, p.q_st, it.row_begin, p.num_q, tid);
  cp_async_commit();
  // Pipeline (tile n): at the top of iteration n the loads of K_{n+1} and V_n are issued; the S_n GEMM
  // and the P_{n-1} V_{n-1} GEMM run together, and the softmax of S_n overlaps the latter. Stage n%2
  // holds K_n and V_n; a stage is rewritten only after the barrier that follows its last reader.
  struct Cur {
    int run, t;
  };
  auto advance = [&](Cur c) -> Cur {
    if (c.t + 1 < runs[c.run].tiles) return {c.run, c.t + 1};
    return {c.run + 1, 0};
  };
  auto tile_start = [&](Cur c) { return runs[c.run].begin + c.t * kBN; };
  Cur cur{it.run_begin, 0};
  bool has = cur.run < it.run_end;
  if (has) {
    load_sw_tile_async<kBN, D, kThreads>(sK, kg, p.k_st, tile_start(cur), p.num_k, tid);
    cp_async_commit();
  }

  float o[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) o[n] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t pa[kBN / 16][4];
  const int row_lo = it.row_begin + warp * 16 + (lane >> 2);
  const uint32_t q_wg = sQ + wg * 64 * 128;
  int n = 0;
  while (has) {
    cp_async_wait<0>();
    fence_async_smem();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
    const Run run = runs[cur.run];
    const int c0 = tile_start(cur);
    const Cur nxt = advance(cur);
    const bool has_next = nxt.run < it.run_end;
    const int st = n & 1;
    if (has_next)
      load_sw_tile_async<kBN, D, kThreads>(sK + (st ^ 1) * kKVBytes, kg, p.k_st, tile_start(nxt), p.num_k, tid);
    load_sw_tile_async<kBN, D, kThreads>(sV + st * kKVBytes, vg, p.v_st, c0, p.num_k, tid);
    cp_async_commit();

    float s[kBN / 2];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk & 3) * 32;  // 16 columns = 32 bytes inside the swizzle atom
      const uint64_t da = smem_desc(q_wg + (kk >> 2) * (kBM * 128) + koff, 16, 1024);
      const uint64_t db = smem_desc(sK + st * kKVBytes + (kk >> 2) * (kBN * 128) + koff, 16, 1024);
      wgmma_ss<T, kBN>(s, da, db, kk > 0 ? 1 : 0);
    }
    wg_commit();
    if (n > 0) {
      // O += P_{n-1} V_{n-1}. V is [key][d]: for B (keys x d) that is N-major; 16 keys are two 8-row
      // groups (SBO apart), d blocks of 64 are LBO apart.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_rs_tb<T, D>(o, pa[kk], smem_desc(sV + (st ^ 1) * kKVBytes + kk * 16 * 128, kBN * 128, 1024));
    }
    wg_commit();   // (an empty group on the first tile: the waits below stay unconditional)
    wg_wait<1>();  // S_n done; the P V GEMM may still run
    reg_fence(s);

    if (run.masked) mask_scores<kBN>(s, p.side.cuts[run.cut], row_lo, c0, lane);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) online_softmax_row<kBN, false>(s, r, m, l, alpha[r], p.scale_log2);
    wg_wait<0>();  // P_{n-1} V_{n-1} done: O may be rescaled and pa rewritten
    reg_fence(o);
    reg_fence_u(pa);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }
    acc_to_a_frags<T>(pa, s);
    cur = nxt;
    has = has_next;
    ++n;
  }
  if (n > 0) {  // the last tile's P V
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      wgmma_rs_tb<T, D>(o, pa[kk], smem_desc(sV + ((n - 1) & 1) * kKVBytes + kk * 16 * 128, kBN * 128, 1024));
    wg_commit();
    wg_wait<0>();
    reg_fence(o);
    reg_fence_u(pa);
  }
  cp_async_wait<0>();  // an item with no tiles still has its Q load in flight
  __syncthreads();

  // Epilogue: normalize, stage this warp's 16 rows in its part of the Q tile, 16-byte stores.
  store_out_lse_warp_rows<T, D, kBM>(smem, warp * 16, o, l, m, static_cast<T*>(p.out) + h * p.o_sh, p.o_st,
                                     p.lse + h * p.lse_sh, p.lse_st, it.row_begin, it.row_end);
}

template <typename T, int D>
void launch_t(TypeTag<T>, DimTag<D>, const FwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = (kBM + 4 * kBN) * D * 2 + 1024;  // Q + 2 stages of K and V + alignment
  const int64_t grid = static_cast<int64_t>(p.side.num_items) * p.heads_q;
  if (grid == 0) return;
  launch_checked("ffa forward (wgmma)", fwd_wgmma_kernel<T, D>, grid, kThreads, kSmem, stream, p);
}

}  // namespace

void launch_forward_wgmma(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream) {
  dispatch_dtype_dim("ffa forward (wgmma)", dtype, head_dim, [&](auto t, auto d) { launch_t(t, d, p, stream); });
}

}  // namespace detail
}  // namespace ffa
