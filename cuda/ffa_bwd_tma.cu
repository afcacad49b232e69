// dK/dV (and dQ) pass of the backward, FlashAttention-3 structure on Hopper: warp specialization with a
// TMA producer. One CTA owns a 128-key tile (one k-side plan item) of one kv head and walks the query
// heads of its GQA group and the item's query tiles in steps of QS queries: QS = 128 at D=64 (two 64-query
// plan tiles of one run per step, FlashAttention-3's 128 x 128 tile), QS = 64 at D=128 (registers).
//   warpgroup 0: producer. Warp 0 loads K and V once (TMA) and then, per step, Q and dO (TMA) and
//                lse, delta (plain loads into shared memory) into a 2-stage ring; full/empty mbarriers
//                hand stages to and from the consumers. The warpgroup gives its registers away. A step
//                whose second 64-query half lies outside the run gets lse = +inf there: P = dS = 0.
//   warpgroups 1, 2: consumers, 64 keys each, sharing every Q/dO tile:
//     S^T  = K Q^T, dP^T = V dO^T        SS-wgmma m64nQS (two commit groups: the exponentials of P
//                                         run while the dP^T GEMM is still in flight)
//                                         -> P^T, dS^T = P^T * (dP^T - delta)
//     dV  += P^T dO, dK += dS^T Q         RS-wgmma (dO, Q read N-major); dK, dV stay in fp32 registers
//     dS^T of both warpgroups -> shared memory (double buffer), one named barrier, then
//     dQ   = dS K over all 128 keys       SS-wgmma, 64 queries x 64 columns per job: QS = 128 has two
//                                         jobs (query half w for warpgroup w), D=128 two (column block w),
//                                         QS = 64 at D=64 one (the warpgroups alternate by step parity)
//     dQ (fp32) -> padded shared rows -> cp.reduce.async.bulk add into the fp32 accumulator, one bulk
//     reduction per row (no per-element atomics; half the dQ traffic of a 64-key CTA).
// No CTA-wide barrier inside the loop; only the two consumer warpgroups meet once per step (dS).
// Kernel 3 of the API runs the QS = 64 variant at D=64 too (the previous default, for comparison).
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
#include "cuda/ffa_tma.h"
#include "cuda/ffa_wgmma.cuh"

namespace ffa {
namespace detail {
namespace {

using namespace dev;

constexpr int kBN = kPlanTileK, kTileQ = kBwdTileQ, kThreads = 384;
static_assert(kBN == 128 && kTileQ == 64, "two consumer warpgroups x 64 keys, 64-query plan tiles");
constexpr int kDqRowFloats = 72;             // 64 columns + 8 floats of padding (conflict-free float2 stores)
constexpr int kDqBytes = 64 * kDqRowFloats * 4;  // one warpgroup's dQ staging: 64 rows x 64 columns

// QS: queries per step (64 or 128).
template <int D, int QS>
struct BwdSmem {
  static constexpr uint32_t kKV = kBN * D * 2, kQ = QS * D * 2, kS = kBN * QS * 2;
  static constexpr uint32_t sK = 0, sV = sK + kKV, sQ = sV + kKV, sdO = sQ + 2 * kQ, sdS = sdO + 2 * kQ;
  static constexpr uint32_t sdQ = sdS + 2 * kS, sLse = sdQ + 2 * kDqBytes, sDelta = sLse + 2 * QS * 4;
  static constexpr uint32_t bars = sDelta + 2 * QS * 4;  // full_kv, full[2], empty[2]
  static constexpr uint32_t total = bars + 5 * 8 + 1024;  // + alignment slack
};

template <typename T, int D, int QS>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_tma_kernel(const BwdParams p, const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_do,
                   const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
  static_assert(QS == 64 || (QS == 128 && D == 64), "128-query steps only fit the registers at D=64");
  using L = BwdSmem<D, QS>;
  constexpr int kCB = D / 64;           // 64-column (128-byte) blocks
  constexpr int kTiles = QS / kTileQ;   // plan tiles per step
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t sK = base + L::sK, sV = base + L::sV, sQ = base + L::sQ, sdO = base + L::sdO, sdS = base + L::sdS;
  const uint32_t sdQ = base + L::sdQ;
  float* sLse = reinterpret_cast<float*>(smem + L::sLse);      // [2][QS], lse * log2(e) (+inf: no row here)
  float* sDelta = reinterpret_cast<float*>(smem + L::sDelta);  // [2][QS]
  const uint32_t full_kv = base + L::bars, full = full_kv + 8, empty = full_kv + 24;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  const int item_idx = blockIdx.x / p.heads_kv;
  const int hk = blockIdx.x % p.heads_kv;
  const Item it = p.k_side.items[item_idx];
  const Run* runs = p.k_side.runs;
  const int c0 = it.row_begin;

  if (tid == 0) {
    mbar_init(full_kv, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(full + 8 * s, 32);    // the producer warp's lanes (lse/delta stores) + the Q/dO bytes (tx)
      mbar_init(empty + 8 * s, 256);  // every consumer thread
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<24>();
    if (warp != 0) return;
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
          if (lane == 0) {  // the copies first: their latency then covers the lse/delta loads below
            mbar_expect_tx_only(full + 8 * s, 2 * L::kQ);
#pragma unroll
            for (int cb = 0; cb < kCB; ++cb) {
              tma_load_3d(sQ + s * L::kQ + cb * (QS * 128), &tm_q, cb * 64, h, q0, full + 8 * s);
              tma_load_3d(sdO + s * L::kQ + cb * (QS * 128), &tm_do, cb * 64, h, q0, full + 8 * s);
            }
          }
          // Rows of this step that belong to the run (the last step of an odd run has one tile).
          const int rows = (run.tiles - t < kTiles ? run.tiles - t : kTiles) * kTileQ;
#pragma unroll
          for (int r = lane; r < QS; r += 32) {
            const int row = q0 + r;
            float lse2 = INFINITY, dl = 0.f;
            if (r < rows && row < p.num_q) {
              const float lse = p.lse[row * p.lse_st + h * p.lse_sh];
              lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;  // empty rows: P = 0, never NaN
              dl = p.delta[static_cast<int64_t>(row) * p.heads_q + h];
            }
            sLse[s * QS + r] = lse2;
            sDelta[s * QS + r] = dl;
          }
          mbar_arrive(full + 8 * s);  // release: this lane's stores
        }
      }
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int cw = wg - 1;      // consumer warpgroup: keys [c0 + 64 cw, c0 + 64 cw + 64)
  const int wq = warp & 3;    // warp within the warpgroup: 16 keys, and 16 rows of the dQ job
  const int key_lo = c0 + cw * 64 + wq * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  const uint32_t k_wg = sK + cw * 64 * 128, v_wg = sV + cw * 64 * 128;
  const uint32_t dq_stage = sdQ + cw * kDqBytes;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int n = 0; n < D / 2; ++n) dk[n] = dv[n] = 0.f;

  mbar_wait(full_kv, 0);
  int n = 0;
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    for (int ri = it.run_begin; ri < it.run_end; ++ri) {
      const Run run = runs[ri];
      const bool masked = run.masked;
      CutSlice cut{};
      if (masked) cut = p.k_side.cuts[run.cut];
      for (int t = 0; t < run.tiles; t += kTiles, ++n) {
        const int s = n & 1;
        const int q0 = run.begin + t * kTileQ;
        const bool full_step = run.tiles - t >= kTiles;  // QS = 128: the second query half is in the run
        const uint32_t q_st = sQ + s * L::kQ, do_st = sdO + s * L::kQ, ds_buf = sdS + s * L::kS;
        mbar_wait(full + 8 * s, (n >> 1) & 1);

        float sc[QS / 2], dp[QS / 2];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t ka = (kk >> 2) * (kBN * 128) + (kk & 3) * 32, kb = (kk >> 2) * (QS * 128) + (kk & 3) * 32;
          wgmma_ss<T, QS>(sc, smem_desc(k_wg + ka, 16, 1024), smem_desc(q_st + kb, 16, 1024), kk > 0 ? 1 : 0);
        }
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t ka = (kk >> 2) * (kBN * 128) + (kk & 3) * 32, kb = (kk >> 2) * (QS * 128) + (kk & 3) * 32;
          wgmma_ss<T, QS>(dp, smem_desc(v_wg + ka, 16, 1024), smem_desc(do_st + kb, 16, 1024), kk > 0 ? 1 : 0);
        }
        wg_commit();
        const float* lse2 = sLse + s * QS;
        const float* dlt = sDelta + s * QS;
        // Masked steps: the visible queries of each of this thread's two keys form one interval of step
        // columns [vlo, vhi] (slice bounds and diagonal band intersected once per step), so the per-element
        // test is two compares. The element loops are instantiated with and without it (a runtime test
        // inside them made the compiler branch per element and serialize on each MUFU result).
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
              const float2 l2 = *reinterpret_cast<const float2*>(lse2 + col);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const float pr = exp2_ftz(fmaf(sc[4 * j + e], p.scale_log2, -((e & 1) ? l2.y : l2.x)));
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
            const float2 d2 = *reinterpret_cast<const float2*>(dlt + col);
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * j + e] = sc[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? d2.y : d2.x));
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
                float pr = exp2_ftz(fmaf(sc[4 * j + e], p.scale_log2, -lse2[col]));
                if (kMask && !visible(col, e >> 1)) pr = 0.f;
                sc[4 * j + e] = pr;
                dp[4 * j + e] = pr * (dp[4 * j + e] - dlt[col]);
              }
          };
          if (masked)
            pds_loop(std::true_type{});
          else
            pds_loop(std::false_type{});
        }
        uint32_t pa[QS / 16][4], da[QS / 16][4];
#pragma unroll
        for (int kk = 0; kk < QS / 16; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            pa[kk][r] = pack2<T>(sc[8 * kk + 2 * r], sc[8 * kk + 2 * r + 1]);
            da[kk][r] = pack2<T>(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
          }
        // dS^T (this warpgroup's 64 keys x QS queries) into rows [64 cw, 64 cw + 64) of the 128-key
        // buffer, in the swizzled layout the dQ GEMM reads M-major (64-query column blocks).
        {
          // stmatrix: lanes 8m..8m+7 address the rows of 8x8 matrix m = (row half m & 1, column half m >> 1).
          const int r = cw * 64 + wq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
          for (int kk = 0; kk < QS / 16; ++kk)
            stsm_x4(ds_buf + sw_off<kBN>(r, kk * 16 + (lane >> 4) * 8), da[kk][0], da[kk][1], da[kk][2], da[kk][3]);
        }
        fence_async_smem();  // ordinary stores, read by wgmma through the async proxy
        reg_fence(dv);
        reg_fence(dk);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < QS / 16; ++kk) {
          wgmma_rs_tb<T, D>(dv, pa[kk], smem_desc(do_st + kk * 16 * 128, QS * 128, 1024));
          // QS = 128 issues dK after dQ (FlashAttention-3's order): the dQ staging below then overlaps
          // the dK GEMM.
          if constexpr (QS == 64) wgmma_rs_tb<T, D>(dk, da[kk], smem_desc(q_st + kk * 16 * 128, QS * 128, 1024));
        }
        wg_commit();
        named_bar_sync(1, 256);  // dS^T of both warpgroups is in the buffer

        // dQ job: 64 queries (query block `mb` of the step) x 64 columns (column block `job` of D) over
        // all 128 keys.
        // QS = 128 runs the GEMM and the staging even for a second half outside the run (last step of an
        // odd run; its dS is 0) and only skips the reduction: branching around them costs ~280 bytes
        // of spills.
        const bool has_job = QS == 128 ? (cw == 0 || full_step) : (D == 128 || (n & 1) == cw);
        const int job = D == 128 ? cw : 0;
        const int mb = QS == 128 ? cw : 0;
        float dq[32];
        if (QS == 128 || has_job) {
          wg_fence();
#pragma unroll
          for (int kk = 0; kk < kBN / 16; ++kk)
            wgmma_ss_tt<T, 64>(dq, smem_desc(ds_buf + mb * (kBN * 128) + kk * 16 * 128, kBN * 128, 1024),
                               smem_desc(sK + job * (kBN * 128) + kk * 16 * 128, kBN * 128, 1024), kk > 0 ? 1 : 0);
          wg_commit();
        }
        if constexpr (QS == 128) {
#pragma unroll
          for (int kk = 0; kk < QS / 16; ++kk)
            wgmma_rs_tb<T, D>(dk, da[kk], smem_desc(q_st + kk * 16 * 128, QS * 128, 1024));
          wg_commit();
          wg_wait<1>();  // dV and dQ are done; dK may still run
        } else {
          wg_wait<0>();
          reg_fence(dk);
          reg_fence_u(da);
          mbar_arrive(empty + 8 * s);  // Q, dO, lse, delta of stage s are no longer read
        }
        reg_fence(dv);
        reg_fence_u(pa);
        if (QS == 128 || has_job) {
          reg_fence(dq);
          // This warp's 16 rows: wait until the bulk reductions of its previous rows have read them.
          if (lane < 16) bulk_wait_read<0>();
          __syncwarp();
          unsigned char* st = smem + (dq_stage - base);
          const int r0 = wq * 16 + (lane >> 2);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int col = j * 8 + (lane & 3) * 2;
            *reinterpret_cast<float2*>(st + (r0 * kDqRowFloats + col) * 4) = make_float2(dq[4 * j], dq[4 * j + 1]);
            *reinterpret_cast<float2*>(st + ((r0 + 8) * kDqRowFloats + col) * 4) =
                make_float2(dq[4 * j + 2], dq[4 * j + 3]);
          }
          fence_async_smem();
          __syncwarp();
          // Lane r < 16 reduces row r: the compiler issues them in one elect loop. (One lane issuing all 16
          // compiled to 16 such loops, ~3x the instructions; D=128 ran 3% slower with it, docs/kernel-log.md v7.)
          const int qrow = q0 + mb * 64 + wq * 16 + lane;
          if (has_job && lane < 16 && qrow < p.num_q) {
            float* dst = p.dq_accum + (static_cast<int64_t>(qrow) * p.heads_q + h) * D + job * 64;
            bulk_reduce_add_f32(dst, dq_stage + (wq * 16 + lane) * kDqRowFloats * 4, 64 * 4);
          }
          if (lane < 16) bulk_commit();
        }
        if constexpr (QS == 128) {
          wg_wait<0>();
          reg_fence(dk);
          reg_fence_u(da);
          mbar_arrive(empty + 8 * s);  // Q, dO, lse, delta of stage s are no longer read
        }
      }
    }
  }
  if (lane < 16) bulk_wait<0>();  // the shared source must outlive the reductions

  // Epilogue: both warpgroups' last dQ GEMMs (which read all of K) are done before K/V are reused as
  // staging for dK (times the softmax scale) and dV.
  named_bar_sync(2, 256);
  store_dkdv_warp_rows<T, D, kBN>(smem + L::sK, smem + L::sV, cw * 64 + wq * 16, dk, dv, p.scale,
                                  static_cast<T*>(p.dk) + hk * p.dk_sh, p.dk_st, static_cast<T*>(p.dv) + hk * p.dv_sh,
                                  p.dv_st, c0, it.row_end);
}

template <typename T, int D, int QS>
void launch_t(int dtype, const BwdParams& p, cudaStream_t stream) {
  const int64_t grid = static_cast<int64_t>(p.k_side.num_items) * p.heads_kv;
  if (grid == 0) return;
  const CUtensorMap tq = make_tensor_map(p.q, dtype, p.num_q, p.heads_q, p.q_st, p.q_sh, D, QS);
  const CUtensorMap tdo = make_tensor_map(p.dout, dtype, p.num_q, p.heads_q, p.do_st, p.do_sh, D, QS);
  const CUtensorMap tk = make_tensor_map(p.k, dtype, p.num_k, p.heads_kv, p.k_st, p.k_sh, D, kBN);
  const CUtensorMap tv = make_tensor_map(p.v, dtype, p.num_k, p.heads_kv, p.v_st, p.v_sh, D, kBN);
  constexpr int kSmem = BwdSmem<D, QS>::total;
  auto kernel = bwd_tma_kernel<T, D, QS>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) throw std::runtime_error(std::string("ffa backward (tma): ") + cudaGetErrorString(err));
  kernel<<<static_cast<unsigned>(grid), kThreads, kSmem, stream>>>(p, tq, tdo, tk, tv);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("ffa backward (tma) launch: ") + cudaGetErrorString(err));
}

}  // namespace

bool dkdv_tma_supported(const BwdParams& p) { return p.num_q > 0 && p.num_k > 0 && p.dq_accum != nullptr; }

void launch_dkdv_tma(int dtype, int head_dim, bool q64_steps, const BwdParams& p, cudaStream_t stream) {
  if (dtype == 0 && head_dim == 64)
    return q64_steps ? launch_t<__nv_bfloat16, 64, 64>(dtype, p, stream) : launch_t<__nv_bfloat16, 64, 128>(dtype, p, stream);
  if (dtype == 0 && head_dim == 128) return launch_t<__nv_bfloat16, 128, 64>(dtype, p, stream);
  if (dtype == 1 && head_dim == 64)
    return q64_steps ? launch_t<__half, 64, 64>(dtype, p, stream) : launch_t<__half, 64, 128>(dtype, p, stream);
  if (dtype == 1 && head_dim == 128) return launch_t<__half, 128, 64>(dtype, p, stream);
  throw std::runtime_error("ffa backward (tma): unsupported dtype/head_dim");
}

}  // namespace detail
}  // namespace ffa
