// Host side of cuda/ffa.h: argument checks (one clear message per mistake), then the launchers.
#include <cmath>
#include <string>

#include "core/errors.h"
#include "cuda/ffa.h"
#include "cuda/ffa_kernels.h"

namespace ffa {
namespace {

using flexcp::fail;

void check_dims(const char* where, const Dims& d, DType dtype) {
  if (d.head_dim != 64 && d.head_dim != 128)
    fail(where, "head_dim " + std::to_string(d.head_dim) + " is not supported", "use 64 or 128");
  if (d.heads_q <= 0 || d.heads_kv <= 0 || d.heads_q % d.heads_kv != 0)
    fail(where, "heads_q=" + std::to_string(d.heads_q) + ", heads_kv=" + std::to_string(d.heads_kv),
         "heads_q must be a positive multiple of heads_kv");
  if (dtype != DType::BF16 && dtype != DType::FP16) fail(where, "dtype must be bf16 or fp16");
  if (d.num_q < 0 || d.num_k < 0 || d.num_q > kMaxTokens || d.num_k > kMaxTokens)
    fail(where, "token counts out of range", "num_q and num_k must lie in [0, 2^30)");
}

void check_tensor(const char* where, const char* name, const TensorRef& t, int64_t tokens) {
  if (tokens == 0) return;
  if (t.data == nullptr) fail(where, std::string(name) + " is null");
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0)
    fail(where, std::string(name) + " is not 16-byte aligned", "pass a contiguous tensor");
  if (t.stride_token % 8 != 0 || t.stride_head % 8 != 0 || t.stride_token < 0 || t.stride_head < 0)
    fail(where,
         std::string(name) + " strides (" + std::to_string(t.stride_token) + ", " + std::to_string(t.stride_head) +
             ") are not non-negative multiples of 8 elements",
         "make the last dimension contiguous and rows 16-byte aligned");
}

void check_lse(const char* where, const char* name, const LseRef& l, int64_t tokens) {
  if (tokens > 0 && l.data == nullptr) fail(where, std::string(name) + " is null");
}

// q_rows: the q-side item rows the kernels will read (0: the q side is not read).
void check_plan(const char* where, const DevicePlan& plan, const Dims& d, int q_rows) {
  const PlanLayout& L = plan.layout;
  if (plan.data == nullptr) fail(where, "plan data is null", "copy plan_serialize(...) to the device");
  if (L.num_q != d.num_q || L.num_k != d.num_k)
    fail(where, "plan was built for num_q=" + std::to_string(L.num_q) + ", num_k=" + std::to_string(L.num_k) +
                    " but the tensors have " + std::to_string(d.num_q) + ", " + std::to_string(d.num_k),
         "build the plan for these tensors");
  if (q_rows > 0 && L.q_tile_rows != q_rows)
    fail(where,
         "plan q tile has " + std::to_string(L.q_tile_rows) + " rows but the kernel needs " + std::to_string(q_rows),
         "build the plan with PlanConfig::fwd_tile_q = ffa::forward_tile_q(kernel, head_dim)");
  if (L.q_tile_cols != detail::kPlanTileQCols || L.k_tile_rows != detail::kPlanTileK || L.k_tile_cols != detail::kBwdTileQ)
    fail(where, "plan tile sizes do not match the kernels", "build the plan with the default PlanConfig");
}

detail::SideView q_view(const DevicePlan& plan) {
  const PlanLayout& L = plan.layout;
  return {reinterpret_cast<const Item*>(plan.data + L.q_items), reinterpret_cast<const Run*>(plan.data + L.q_runs),
          reinterpret_cast<const CutSlice*>(plan.data + L.q_cuts), L.q_num_items};
}
detail::SideView k_view(const DevicePlan& plan) {
  const PlanLayout& L = plan.layout;
  return {reinterpret_cast<const Item*>(plan.data + L.k_items), reinterpret_cast<const Run*>(plan.data + L.k_runs),
          reinterpret_cast<const CutSlice*>(plan.data + L.k_cuts), L.k_num_items};
}

// What forward and backward both read: dims, q/k/v/out/lse shaped by them, and the plan.
void check_inputs(const char* where, const Dims& d, DType dtype, const TensorRef& q, const TensorRef& k,
                  const TensorRef& v, const TensorRef& out, const LseRef& lse, const DevicePlan& plan, int q_rows) {
  check_dims(where, d, dtype);
  check_tensor(where, "q", q, d.num_q);
  check_tensor(where, "k", k, d.num_k);
  check_tensor(where, "v", v, d.num_k);
  check_tensor(where, "out", out, d.num_q);
  check_lse(where, "lse", lse, d.num_q);
  check_plan(where, plan, d, q_rows);
}

float resolve_scale(const char* where, float scale, int head_dim) {
  if (scale == 0.f) return 1.f / std::sqrt(static_cast<float>(head_dim));
  if (!(scale > 0.f) || !std::isfinite(scale)) fail(where, "softmax_scale must be positive and finite");
  return scale;
}

constexpr float kLog2e = 1.4426950408889634f;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// delta (Tq, Hq), or for backward kernel 5 (never deterministic) the per-head stats in the same
// memory (BwdParams::stats: lse and delta, stats_rows_for(Tq) rows per head).
size_t delta_region_bytes(const Dims& d, bool deterministic) {
  const size_t rowheads = static_cast<size_t>(d.num_q) * static_cast<size_t>(d.heads_q);
  if (deterministic || d.num_q == 0) return align256(rowheads * sizeof(float));
  const size_t stats = 2 * static_cast<size_t>(d.heads_q) * static_cast<size_t>(detail::stats_rows_for(d.num_q));
  return align256((rowheads > stats ? rowheads : stats) * sizeof(float));
}

}  // namespace

int forward_tile_q(int kernel, int head_dim) {
  return kernel == 3 || kernel == 5 ? detail::forward_overlap_tile_q(head_dim) : detail::kFwdTileQ;
}

void forward(const ForwardArgs& a, const DevicePlan& plan, cudaStream_t stream) {
  const char* where = "ffa::forward";
  const Dims& d = a.dims;
  if (a.kernel == 4)
    fail(where, "forward kernel 4 (v9, a polynomial exp2) was removed",
         "use 3 (v8) or 5 (v8 on a persistent grid) (ForwardArgs::kernel; FLEXCP_FFA_FWD_KERNEL in flexcp)");
  if (a.kernel < 0 || a.kernel > 5)
    fail(where, "unknown forward kernel " + std::to_string(a.kernel),
         "use 0 (tma), 1 (wgmma), 2 (mma.sync), 3 (v8: tma with intra-warpgroup overlap) or 5 (v10: v8 on a "
         "persistent grid)");
  check_inputs(where, d, a.dtype, a.q, a.k, a.v, a.out, a.lse, plan, forward_tile_q(a.kernel, d.head_dim));
  detail::FwdParams p{};
  p.q = a.q.data, p.k = a.k.data, p.v = a.v.data, p.out = a.out.data, p.lse = a.lse.data;
  p.q_st = a.q.stride_token, p.q_sh = a.q.stride_head, p.k_st = a.k.stride_token, p.k_sh = a.k.stride_head;
  p.v_st = a.v.stride_token, p.v_sh = a.v.stride_head, p.o_st = a.out.stride_token, p.o_sh = a.out.stride_head;
  p.lse_st = a.lse.stride_token, p.lse_sh = a.lse.stride_head;
  p.num_q = static_cast<int>(d.num_q), p.num_k = static_cast<int>(d.num_k);
  p.heads_q = d.heads_q, p.heads_kv = d.heads_kv, p.group = d.heads_q / d.heads_kv;
  p.scale_log2 = resolve_scale(where, a.softmax_scale, d.head_dim) * kLog2e;
  p.side = q_view(plan);
  if (a.kernel == 0)
    detail::launch_forward_tma(static_cast<int>(a.dtype), d.head_dim, p, stream);
  else if (a.kernel == 1)
    detail::launch_forward_wgmma(static_cast<int>(a.dtype), d.head_dim, p, stream);
  else if (a.kernel == 2)
    detail::launch_forward(static_cast<int>(a.dtype), d.head_dim, p, stream);
  else
    detail::launch_forward_overlap(a.kernel, static_cast<int>(a.dtype), d.head_dim, p, stream);
}

size_t backward_workspace_bytes(const Dims& d, bool deterministic) {
  const size_t rowheads = static_cast<size_t>(d.num_q) * static_cast<size_t>(d.heads_q);
  size_t bytes = delta_region_bytes(d, deterministic);
  if (!deterministic) bytes += align256(rowheads * static_cast<size_t>(d.head_dim) * sizeof(float));  // dq accum
  return bytes;
}

void backward(const BackwardArgs& a, const DevicePlan& plan, cudaStream_t stream) {
  const char* where = "ffa::backward";
  const Dims& d = a.dims;
  // Only the deterministic dQ pass walks the q side (with 128-row items).
  check_inputs(where, d, a.dtype, a.q, a.k, a.v, a.out, a.lse, plan, a.deterministic ? detail::kFwdTileQ : 0);
  check_tensor(where, "dout", a.dout, d.num_q);
  check_tensor(where, "dq", a.dq, d.num_q);
  check_tensor(where, "dk", a.dk, d.num_k);
  check_tensor(where, "dv", a.dv, d.num_k);
  if (backward_workspace_bytes(d, a.deterministic) > 0 && a.workspace == nullptr)
    fail(where, "workspace is null", "allocate backward_workspace_bytes(dims, deterministic) bytes");
  if (reinterpret_cast<uintptr_t>(a.workspace) % 256 != 0) fail(where, "workspace must be 256-byte aligned");
  detail::BwdParams p{};
  p.q = a.q.data, p.k = a.k.data, p.v = a.v.data, p.out = a.out.data, p.dout = a.dout.data, p.lse = a.lse.data;
  p.dq = a.dq.data, p.dk = a.dk.data, p.dv = a.dv.data;
  p.delta = static_cast<float*>(a.workspace);
  p.dq_accum = a.deterministic
                   ? nullptr
                   : reinterpret_cast<float*>(static_cast<char*>(a.workspace) + delta_region_bytes(d, false));
  p.q_st = a.q.stride_token, p.q_sh = a.q.stride_head, p.k_st = a.k.stride_token, p.k_sh = a.k.stride_head;
  p.v_st = a.v.stride_token, p.v_sh = a.v.stride_head, p.o_st = a.out.stride_token, p.o_sh = a.out.stride_head;
  p.do_st = a.dout.stride_token, p.do_sh = a.dout.stride_head, p.lse_st = a.lse.stride_token,
  p.lse_sh = a.lse.stride_head;
  p.dq_st = a.dq.stride_token, p.dq_sh = a.dq.stride_head, p.dk_st = a.dk.stride_token, p.dk_sh = a.dk.stride_head;
  p.dv_st = a.dv.stride_token, p.dv_sh = a.dv.stride_head;
  p.num_q = static_cast<int>(d.num_q), p.num_k = static_cast<int>(d.num_k);
  p.heads_q = d.heads_q, p.heads_kv = d.heads_kv, p.group = d.heads_q / d.heads_kv;
  p.scale = resolve_scale(where, a.softmax_scale, d.head_dim);
  p.scale_log2 = p.scale * kLog2e;
  p.q_side = q_view(plan);
  p.k_side = k_view(plan);
  if (a.kernel == 0 || a.kernel == 3)
    fail(where,
         "backward kernel " + std::to_string(a.kernel) + " (v7 TMA" + (a.kernel == 3 ? " with 64-query steps" : "") +
             ") was removed",
         "use 5 (the default) (BackwardArgs::kernel; FLEXCP_FFA_BWD_KERNEL in flexcp)");
  if (a.kernel == 4)
    fail(where, "backward kernel 4 (ping-pong) was removed",
         "use 5, the same kernel without the ping-pong order (BackwardArgs::kernel; FLEXCP_FFA_BWD_KERNEL in flexcp)");
  if (a.kernel != 1 && a.kernel != 2 && a.kernel != 5)
    fail(where, "unknown backward kernel " + std::to_string(a.kernel),
         "use 5 (tma, dQ writer warps; the default), 1 (wgmma) or 2 (mma.sync)");
  detail::launch_backward(static_cast<int>(a.dtype), d.head_dim, a.deterministic, a.kernel, p, stream);
}

void merge(const MergeArgs& a, cudaStream_t stream) {
  const char* where = "ffa::merge";
  if (a.num_tokens < 0 || a.heads <= 0 || a.head_dim <= 0) fail(where, "bad shape");
  if (a.num_tokens == 0) return;
  if (!a.o1.data || !a.o2.data || !a.out.data || !a.lse1.data || !a.lse2.data || !a.lse.data)
    fail(where, "null pointer");
  detail::MergeParams p{};
  p.o1 = a.o1.data, p.o2 = a.o2.data, p.out = a.out.data, p.lse1 = a.lse1.data, p.lse2 = a.lse2.data, p.lse = a.lse.data;
  p.o1_st = a.o1.stride_token, p.o1_sh = a.o1.stride_head, p.o2_st = a.o2.stride_token, p.o2_sh = a.o2.stride_head;
  p.out_st = a.out.stride_token, p.out_sh = a.out.stride_head;
  p.l1_st = a.lse1.stride_token, p.l1_sh = a.lse1.stride_head, p.l2_st = a.lse2.stride_token,
  p.l2_sh = a.lse2.stride_head, p.l_st = a.lse.stride_token, p.l_sh = a.lse.stride_head;
  p.num_tokens = a.num_tokens, p.heads = a.heads, p.head_dim = a.head_dim;
  detail::launch_merge(static_cast<int>(a.dtype), p, stream);
}

}  // namespace ffa
