// Forward pass, FlashAttention-3 structure on Hopper: warp specialization with a TMA producer.
//   warpgroup 0: producer. One thread issues bulk tensor copies (TMA) of Q once and of K, V tiles into
//                a 2-stage ring; full/empty mbarriers hand stages to and from the consumers. The
//                warpgroup gives its registers away (setmaxnreg.dec).
//   warpgroups 1, 2: consumers, 64 query rows each (128-row q tile), 128-key tiles. S = Q K^T as
//                SS-wgmma, softmax in registers, O += P V as RS-wgmma (V N-major). Ping-pong: named
//                barriers make the two consumers issue their S GEMMs alternately, so one warpgroup's
//                softmax overlaps the other's GEMMs.
// No CTA-wide barrier inside the loop. Tiles, masks and empty rows as in the other forward kernels.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_epilogue.cuh"
#include "cuda/ffa_hopper.cuh"
#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"
#include "cuda/ffa_tma.h"
#include "cuda/ffa_wgmma.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBM = 128, kBN = kPlanTileQCols, kThreads = 384;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_tma_kernel(const FwdParams p, const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v) {
  constexpr uint32_t kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  constexpr int kCB = D / 64;  // 64-column (128-byte) blocks
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sQ - raw);
  const uint32_t sK = sQ + kQBytes, sV = sK + 2 * kKVBytes;
  const uint32_t bars = sV + 2 * kKVBytes;  // full_q, full_k[2], full_v[2], empty[2]
  const uint32_t full_q = bars, full_k = bars + 8, full_v = bars + 24, empty = bars + 40;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  const QWorkTile wt = q_work_tile(p.side, p.heads_q, p.group, blockIdx.x);
  const Item it = wt.it;
  const int h = wt.h, hk = wt.hk;
  const Run* runs = p.side.runs;

  if (tid == 0) {
    mbar_init(full_q, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(full_k + 8 * s, 1);
      mbar_init(full_v + 8 * s, 1);
      mbar_init(empty + 8 * s, 256);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<24>();
    if (tid == 0) {
      mbar_expect_tx(full_q, kQBytes);
#pragma unroll
      for (int cb = 0; cb < kCB; ++cb) tma_load_3d(sQ + cb * (kBM * 128), &tm_q, cb * 64, h, it.row_begin, full_q);
      int n = 0;
      for (int ri = it.run_begin; ri < it.run_end; ++ri) {
        const Run run = runs[ri];
        for (int t = 0; t < run.tiles; ++t, ++n) {
          const int s = n & 1;
          if (n >= 2) mbar_wait(empty + 8 * s, ((n >> 1) - 1) & 1);
          const int c0 = run.begin + t * kBN;
          mbar_expect_tx(full_k + 8 * s, kKVBytes);
#pragma unroll
          for (int cb = 0; cb < kCB; ++cb)
            tma_load_3d(sK + s * kKVBytes + cb * (kBN * 128), &tm_k, cb * 64, hk, c0, full_k + 8 * s);
          mbar_expect_tx(full_v + 8 * s, kKVBytes);
#pragma unroll
          for (int cb = 0; cb < kCB; ++cb)
            tma_load_3d(sV + s * kKVBytes + cb * (kBN * 128), &tm_v, cb * 64, hk, c0, full_v + 8 * s);
        }
      }
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int cw = wg - 1;                // consumer warpgroup 0 or 1
  const int bar_mine = 1 + cw, bar_other = 2 - cw;  // named barriers 1, 2 (0 is __syncthreads)
  const int wrow = (warp - 4) * 16;     // this warp's first row in the q tile
  const int row_lo = it.row_begin + wrow + (lane >> 2);
  const uint32_t q_wg = sQ + cw * 64 * 128;

  float o[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) o[n] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  if (cw == 1) named_bar_arrive(1, 256);  // consumer 0 issues first
  mbar_wait(full_q, 0);
  int n = 0;
  for (int ri = it.run_begin; ri < it.run_end; ++ri) {
    const Run run = runs[ri];
    for (int t = 0; t < run.tiles; ++t, ++n) {
      const int s = n & 1;
      const uint32_t parity = (n >> 1) & 1;
      const int c0 = run.begin + t * kBN;
      mbar_wait(full_k + 8 * s, parity);
      float sc[kBN / 2];
      named_bar_sync(bar_mine, 256);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t koff = (kk & 3) * 32;
        const uint64_t da = smem_desc(q_wg + (kk >> 2) * (kBM * 128) + koff, 16, 1024);
        const uint64_t db = smem_desc(sK + s * kKVBytes + (kk >> 2) * (kBN * 128) + koff, 16, 1024);
        wgmma_ss<T, kBN>(sc, da, db, kk > 0 ? 1 : 0);
      }
      wg_commit();
      named_bar_arrive(bar_other, 256);  // the other consumer may issue its GEMM now
      wg_wait<0>();
      reg_fence(sc);

      if (run.masked) mask_scores<kBN>(sc, p.side.cuts[run.cut], row_lo, c0, lane);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float alpha;
        online_softmax_row<kBN, true>(sc, r, m, l, alpha, p.scale_log2);
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[4 * j + 2 * r] *= alpha;
          o[4 * j + 2 * r + 1] *= alpha;
        }
      }
      uint32_t pa[kBN / 16][4];
      acc_to_a_frags<T>(pa, sc);
      mbar_wait(full_v + 8 * s, parity);
      reg_fence(o);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_rs_tb<T, D>(o, pa[kk], smem_desc(sV + s * kKVBytes + kk * 16 * 128, kBN * 128, 1024));
      wg_commit();
      wg_wait<0>();
      reg_fence(o);
      reg_fence_u(pa);
      mbar_arrive(empty + 8 * s);  // this consumer is done with stage s
    }
  }
  if (cw == 0) named_bar_sync(1, 256);  // consume consumer 1's last arrive

  // Epilogue through this warpgroup's own rows of the Q tile (its wgmma reads are complete).
  store_out_lse_warp_rows<T, D, kBM>(smem, wrow, o, l, m, static_cast<T*>(p.out) + h * p.o_sh, p.o_st,
                                     p.lse + h * p.lse_sh, p.lse_st, it.row_begin, it.row_end);
}

template <typename T, int D>
void launch_t(TypeTag<T>, DimTag<D>, int dtype, const FwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = (kBM + 4 * kBN) * D * 2 + 1024 + 64;  // + alignment + mbarriers
  const int64_t grid = static_cast<int64_t>(p.side.num_items) * p.heads_q;
  if (grid == 0) return;
  // No keys at all (e.g. a context-parallel stage with nothing to attend): every item only writes
  // out = 0, lse = -inf, and k/v may be null, which a tensor map cannot describe.
  if (p.num_k == 0) return launch_forward_wgmma(dtype, D, p, stream);
  const CUtensorMap tq = make_tensor_map(p.q, dtype, p.num_q, p.heads_q, p.q_st, p.q_sh, D, kBM);
  const CUtensorMap tk = make_tensor_map(p.k, dtype, p.num_k, p.heads_kv, p.k_st, p.k_sh, D, kBN);
  const CUtensorMap tv = make_tensor_map(p.v, dtype, p.num_k, p.heads_kv, p.v_st, p.v_sh, D, kBN);
  launch_checked("ffa forward (tma)", fwd_tma_kernel<T, D>, grid, kThreads, kSmem, stream, p, tq, tk, tv);
}

}  // namespace

CUtensorMap make_tensor_map(const void* base, int dtype, int64_t tokens, int heads, int64_t stride_token,
                            int64_t stride_head, int head_dim, int rows) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens > 0 ? tokens : 1)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(stride_head * 2), static_cast<cuuint64_t>(stride_token * 2)};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(rows)};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r = cuTensorMapEncodeTiled(
      &map, dtype == 0 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
      const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("ffa (tma): cuTensorMapEncodeTiled failed, code " + std::to_string(r));
  return map;
}

void launch_forward_tma(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream) {
  dispatch_dtype_dim("ffa forward (tma)", dtype, head_dim, [&](auto t, auto d) { launch_t(t, d, dtype, p, stream); });
}

}  // namespace detail
}  // namespace ffa
