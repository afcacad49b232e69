// Internal: kernel parameter blocks and launchers behind cuda/ffa.h (argument checks live in
// ffa_api.cu; the launchers trust their inputs).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ffa_plan.h"

namespace ffa {
namespace detail {

// Tile shapes of the mma.sync kernels; the plan must be built with the same (PlanConfig defaults).
constexpr int kFwdTileQ = 128, kFwdTileK = 64, kFwdThreads = 256;
// Key tile of the q-side plan; the mma.sync kernels walk it as kPlanTileQCols / kFwdTileK sub-tiles.
constexpr int kPlanTileQCols = 128;
// Key rows of a k-side plan item (backward kernel 5's CTA: two warpgroups x 64 keys); the older dK/dV
// kernels own kBwdTileK = 64 keys per CTA and run two CTAs per item (halves of its rows).
constexpr int kPlanTileK = 128;
constexpr int kBwdTileK = 64, kBwdTileQ = 64, kBwdThreads = 128;
// Rows of the per-head backward stats (BwdParams::stats) past the last query: a 128-query step that
// starts at the last row stays inside. stats_rows_for() is a multiple of 8 (16-byte TMA strides).
constexpr int kStatsPad = 128;
constexpr int64_t stats_rows_for(int64_t num_q) { return (num_q + kStatsPad + 7) / 8 * 8; }

struct SideView {
  const Item* items;
  const Run* runs;
  const CutSlice* cuts;
  int num_items;
};

struct FwdParams {
  const void *q, *k, *v;
  void* out;
  float* lse;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh, lse_st, lse_sh;
  int num_q, num_k, heads_q, heads_kv, group;
  float scale_log2;  // softmax scale * log2(e)
  SideView side;
};

struct BwdParams {
  const void *q, *k, *v, *out, *dout;
  const float* lse;
  void *dq, *dk, *dv;
  float* dq_accum;  // (Tq, Hq, D) fp32, atomic path only
  float* delta;     // (Tq, Hq) fp32: rowsum(dout * out)
  // Kernel 5 instead of delta: per query head, stats_rows values of lse * log2(e) (+inf for rows with no
  // key and rows past num_q), then stats_rows values of delta (0 past num_q); same memory as delta.
  float* stats;
  int stats_rows;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh, do_st, do_sh, lse_st, lse_sh;
  int64_t dq_st, dq_sh, dk_st, dk_sh, dv_st, dv_sh;
  int num_q, num_k, heads_q, heads_kv, group;
  float scale, scale_log2;
  SideView q_side, k_side;
};

struct MergeParams {
  const void *o1, *o2;
  void* out;
  const float *lse1, *lse2;
  float* lse;
  int64_t o1_st, o1_sh, o2_st, o2_sh, out_st, out_sh;
  int64_t l1_st, l1_sh, l2_st, l2_sh, l_st, l_sh;
  int64_t num_tokens;
  int heads, head_dim;
};

// T is 0 = bf16, 1 = fp16 (DType values).
void launch_forward(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream);        // mma.sync
void launch_forward_wgmma(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream);  // sm_90a wgmma
void launch_forward_tma(int dtype, int head_dim, const FwdParams& p, cudaStream_t stream);    // + TMA, warp-specialized
// v8 (ForwardArgs::kernel 3): + intra-warpgroup overlap, 3 consumer warpgroups at D=64; v10 (kernel 5): the
// same kernel on a persistent grid (one CTA per SM looping over the work tiles). `kernel` is 3 or 5. Their q
// tile (the plan's fwd_tile_q) is forward_overlap_tile_q(head_dim): 192 at D=64, 128 at D=128.
void launch_forward_overlap(int kernel, int dtype, int head_dim, const FwdParams& p, cudaStream_t stream);
int forward_overlap_tile_q(int head_dim);
// dkdv_kernel: 1 = wgmma with cp.async loads (sm_90a; the deterministic mode always runs it), 2 = mma.sync,
// 5 = TMA warp-specialized with the consumers out of lockstep, dQ writer warps and per-head stats (v8-bwd;
// sm_90a; atomic dQ only). (0 and 3, the v7 TMA kernel with 128- / 64-query steps at D=64, and 4, 5 with
// a ping-pong issue order and a dQ job slot, were removed: docs/kernel-log.md.)
void launch_backward(int dtype, int head_dim, bool deterministic, int dkdv_kernel, const BwdParams& p,
                     cudaStream_t stream);
void launch_dkdv_wgmma(int dtype, int head_dim, bool atomic_dq, const BwdParams& p, cudaStream_t stream);
// Kernel 5 (cuda/ffa_bwd_dqwriter.cu); reads p.stats instead of p.lse / p.delta, and needs queries, keys
// and the fp32 dQ accumulator (launch_backward runs kernel 1 otherwise).
void launch_dkdv_dqwriter(int dtype, int head_dim, const BwdParams& p, cudaStream_t stream);
void launch_merge(int dtype, const MergeParams& p, cudaStream_t stream);

}  // namespace detail
}  // namespace ffa
