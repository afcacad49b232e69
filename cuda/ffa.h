// Flexible flash attention on Hopper: a plain C++ API over raw device pointers, strides and a stream
// (no LibTorch), so the kernels can be tested and benchmarked on their own.
//
// Layout (docs/attention-spec.md): q (Tq, Hq, D), k and v (Tk, Hkv, D), out (Tq, Hq, D) in the input
// dtype, lse (Tq, Hq) fp32 natural log. The last dimension must be contiguous; token and head strides
// are free (in elements, multiples of 8, base pointers 16-byte aligned). D is 64 or 128.
//
// Use: build a Plan on the host (cuda/ffa_plan.h), serialize it, copy the int32 array to the device
// (the caller owns that memory, so it can cache it per spec), then call forward / backward.
// Errors in arguments throw flexcp::UserError; CUDA launch errors throw std::runtime_error.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/ffa_plan.h"

namespace ffa {

enum class DType : int32_t { BF16 = 0, FP16 = 1, FP32 = 2 };

struct TensorRef {
  void* data = nullptr;
  int64_t stride_token = 0;  // elements
  int64_t stride_head = 0;   // elements
};

struct LseRef {
  float* data = nullptr;
  int64_t stride_token = 0;
  int64_t stride_head = 0;
};

struct Dims {
  int64_t num_q = 0, num_k = 0;
  int32_t heads_q = 0, heads_kv = 0, head_dim = 0;
};

// The serialized plan on the device.
struct DevicePlan {
  const int32_t* data = nullptr;  // device copy of plan_serialize(...)
  PlanLayout layout;
};

struct ForwardArgs {
  Dims dims;
  DType dtype = DType::BF16;
  TensorRef q, k, v, out;
  LseRef lse;
  float softmax_scale = 0.f;  // 0 means 1/sqrt(D)
  // Kernel: 0 = TMA producer + wgmma consumers (warp-specialized, the default here), 1 = wgmma with
  // cp.async loads, 2 = mma.sync (FlashAttention-2 style fallback), 3 = v8 (flexcp's ffa backend
  // default): 0 plus the softmax of a key tile overlapped with the next tile's S GEMM inside each
  // consumer warpgroup and, at D=64, three consumer warpgroups over 192-row q tiles. (4 was v9, a
  // polynomial exp2 for part of the softmax: 5-7% slower, removed and refused; docs/kernel-log.md "v9".)
  // 5 = v10: v8 on a persistent grid (one CTA per SM walks a static list of work tiles, so one tile's
  // epilogue and the next one's loads overlap; the same results as 3, bit for bit; opt-in until timed,
  // docs/kernel-log.md "v10"). The plan's q tile must be forward_tile_q(kernel, head_dim).
  int kernel = 0;
};

void forward(const ForwardArgs& args, const DevicePlan& plan, cudaStream_t stream);

// Query rows per q-side plan item that forward kernel `kernel` needs at `head_dim`: 192 for kernels 3
// and 5 at D=64, else 128 (PlanConfig{}.fwd_tile_q). Build the plan with PlanConfig::fwd_tile_q set to it. The
// backward reads the q side only when deterministic, and then needs 128.
int forward_tile_q(int kernel, int head_dim);

struct BackwardArgs {
  Dims dims;
  DType dtype = DType::BF16;
  TensorRef q, k, v, out, dout;
  LseRef lse;
  TensorRef dq, dk, dv;  // outputs, overwritten
  float softmax_scale = 0.f;
  // Fixed reduction order: dQ is computed by its own pass over the query-side work list instead of
  // fp32 atomics from the key-side pass (about 1.4x the backward FLOPs, bitwise reproducible).
  bool deterministic = false;
  void* workspace = nullptr;  // backward_workspace_bytes(dims, deterministic), 256-byte aligned
  // dK/dV kernel: 5 = TMA producer + two wgmma consumer warpgroups out of lockstep, dQ writer warps and
  // per-head lse/delta (sm_90a, the default and flexcp's ffa backend default; docs/kernel-log.md v8-bwd;
  // deterministic calls run 1 instead), 1 = wgmma with cp.async loads, 2 = mma.sync (FlashAttention-2
  // style fallback). 0 and 3 (the v7 TMA kernel, without 5's changes, with 128- / 64-query steps at D=64)
  // were removed as 0.89-0.97x of 5, and 4 (5 with a ping-pong issue order and a dQ job slot) as no
  // faster with a racecheck report on its job slot; all three are refused.
  int kernel = 5;
};

size_t backward_workspace_bytes(const Dims& dims, bool deterministic);
void backward(const BackwardArgs& args, const DevicePlan& plan, cudaStream_t stream);

// Merge of two partial results for the same rows (attention-spec.md, "Merging"), in fp32:
//   lse = logaddexp(lse1, lse2); out = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2
// A part with lse -inf contributes nothing; two empty parts give out 0, lse -inf. out/lse may alias
// o1/lse1 (in-place accumulation). o1, o2 and out share `dtype` (BF16, FP16 or FP32).
struct MergeArgs {
  int64_t num_tokens = 0;
  int32_t heads = 0, head_dim = 0;
  DType dtype = DType::BF16;
  TensorRef o1, o2, out;
  LseRef lse1, lse2, lse;
};
void merge(const MergeArgs& args, cudaStream_t stream);

// FLOPs of the forward pass by the spec's convention: 4 * D * Hq * visible pairs (backward = 2.5x).
inline double forward_flops(const Plan& plan, const Dims& d) {
  return 4.0 * d.head_dim * d.heads_q * static_cast<double>(plan.visible_pairs);
}

}  // namespace ffa
