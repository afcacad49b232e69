// Fused CUDA versions of the Llama step's element-wise work (cuda/train_kernels.h) as differentiable
// LibTorch functions. Each returns undefined tensors when it does not apply (fused ops turned off,
// CPU tensors, a dtype other than bf16, an unsupported shape, or a build without CUDA LibTorch);
// the caller then runs its torch composite, so the CPU path is exactly the unfused one.
// Defined in fused_ops_cuda.cpp (CUDA builds) or fused_ops.cpp (the "does not apply" stubs).
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "core/rope.h"

namespace flexcp {

// Process-wide switch, on by default; FLEXCP_FUSED_OPS=0 in the environment turns it off (for A/B
// timings and checks). Tests flip it with fused_ops_set_enabled.
bool fused_ops_enabled();
void fused_ops_set_enabled(bool on);

// RMSNorm as RMSNormImpl computes it: weight * bf16(x * rsqrt(mean(x^2, -1) + eps)).
at::Tensor fused_rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// h = x + delta (the residual add, rounded as torch's bf16 add) and y = RMSNorm(h) as fused_rmsnorm
// computes it, in one kernel; the backward takes the gradients of both and gives x and delta the
// same gradient, grad_h + RMSNorm's backward of grad_y, in one kernel. Returns {h, y}.
// FLEXCP_FUSED_ADD_NORM=0 turns this op alone off (A/B timings): the caller's add + fused_rmsnorm.
std::pair<at::Tensor, at::Tensor> fused_add_rmsnorm(const at::Tensor& x, const at::Tensor& delta,
                                                    const at::Tensor& weight, double eps);

// rope_apply of q (T, Hq, D) and k (T, Hkv, D) in one kernel launch.
std::pair<at::Tensor, at::Tensor> fused_rope(const at::Tensor& q, const at::Tensor& k, const RopeCosSin& cs);

// silu(gate) * up.
at::Tensor fused_swiglu(const at::Tensor& gate, const at::Tensor& up);

// x (T, in) @ w^T for a weight whose .grad is a dense bf16 tensor already (the optimizer's flat
// gradient view): the backward's dW GEMM adds into .grad itself and hands autograd no gradient for
// w, saving autograd's separate accumulation pass. Undefined when that does not apply (then
// torch's linear). The packed projections below add their weight gradients the same way.
// FLEXCP_FUSED_WGRAD=0 turns the in-place accumulation off (autograd accumulates, as before).
at::Tensor fused_linear(const at::Tensor& x, const at::Tensor& w);

// Projections as one GEMM where their weights are one matrix already: wk's rows start where wq's end
// in one storage (and wv's where wk's end), as in the optimizer's flat bf16 model buffer. No copy of
// the weights; elsewhere (separate tensors, as in a model without FlatAdamW) these do not apply.
//
// x (T, hidden) -> q (T, Hq, D), k and v (T, Hkv, D): rope_apply of x @ wq^T and x @ wk^T, and
// x @ wv^T. Returns {} when it does not apply, else {q, k, v}.
std::vector<at::Tensor> fused_qkv_rope(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                       const at::Tensor& wv, const RopeCosSin& cs, int64_t heads_q, int64_t heads_kv,
                                       int64_t head_dim);
// x (T, hidden) -> silu(x @ wg^T) * (x @ wu^T), wu's rows after wg's.
at::Tensor fused_gate_up_swiglu(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu);

// The scalar fp32 sum of -log softmax(hidden @ weight^T)[label] over labels != ignore_index, as
// chunked_cross_entropy computes it; labels are int64 on hidden's device and already validated.
// chunk_tokens 0 picks chunks of about 1 GiB of bf16 logits (FLEXCP_CE_CHUNK_MIB overrides).
at::Tensor fused_cross_entropy_sum(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                   int64_t chunk_tokens, int64_t ignore_index);

}  // namespace flexcp
