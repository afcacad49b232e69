// The fused CUDA passes of FlatAdamW (cuda/optim.h) over LibTorch tensors. Defined in
// optimizer_fused_cuda.cpp, which only CUDA builds compile: callers guard their calls with
// FLEXCP_OPTIMIZER_FUSED (set below when the build has them).
#pragma once
#include <ATen/core/Tensor.h>

#if defined(FLEXCP_WITH_TORCH_CUDA) && defined(FLEXCP_WITH_FFA)
#define FLEXCP_OPTIMIZER_FUSED 1
#endif

namespace flexcp {

// One AdamW step's scalars, in double as the torch-op path passes them to torch (which rounds them
// to fp32 for fp32 tensors, as the fused kernel does).
struct AdamWScalars {
  double decay_factor = 1;  // 1 - lr * weight_decay
  double beta1 = 0.9, one_minus_beta1 = 0.1;
  double beta2 = 0.95, one_minus_beta2 = 0.05;
  double bias2_sqrt = 1;    // sqrt(1 - beta2^t)
  double eps = 1e-8;
  double step_size = 0;     // -lr / (1 - beta1^t)
};

// master, exp_avg, exp_avg_sq, grad: flat fp32 CUDA tensors of one size; model: the flat bf16 copy
// to refresh, or undefined. grad_scale (fp32) and skip (bool): device scalars, or undefined.
// grad may instead be the model's flat bf16 gradient: the step then reads it as fp32 (the same update
// bit for bit as from its fp32 copy) and zeroes it, unless skip is set.
void fused_adamw_step(at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& grad,
                      const at::Tensor& model, int64_t decay_numel, const AdamWScalars& s,
                      const at::Tensor& grad_scale, const at::Tensor& skip);

// buf (flat bf16) = 0 where the device flag (bool scalar) is true, without a host sync.
void fused_zero_if(at::Tensor& buf, const at::Tensor& flag);

// grad (fp32) (+)= model_grad (bf16), then model_grad = 0; overwrite: grad = model_grad.
void fused_grads_accumulate(at::Tensor& grad, at::Tensor& model_grad, bool overwrite);

}  // namespace flexcp
