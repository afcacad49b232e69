// Fused optimizer passes over flat buffers (core/optimizer.h's FlatAdamW on CUDA): a plain C++ API
// over raw device pointers and a stream, no LibTorch. Each pass is one memory-bound kernel, so the
// optimizer step costs one read and one write of its state instead of a dozen torch element-wise
// passes. Values the host does not know without a sync (the clip factor, the skip decision of the
// numerics guard) are read from device memory by the kernel.
//
// fp32 pointers should be 16-byte aligned and bf16 ones 8-byte aligned (any torch allocation is) for
// the vectorised kernels; other pointers get a scalar kernel. CUDA launch errors throw
// std::runtime_error.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace optim {

struct AdamWStep {
  float* master = nullptr;      // fp32 weights, updated in place
  float* exp_avg = nullptr;     // fp32 first moment
  float* exp_avg_sq = nullptr;  // fp32 second moment
  const float* grad = nullptr;  // fp32 gradient (not modified)
  // Or, instead of grad: the model's bf16 gradient (one micro-batch, no fp32 copy). The step zeroes
  // it after reading, so the next backward accumulates into zeros; a skipped step leaves it as is.
  uint16_t* grad_bf16 = nullptr;
  uint16_t* model = nullptr;    // bf16 copy of the new weights (the model's parameters), or null
  int64_t numel = 0;
  int64_t decay_numel = 0;      // weight decay applies to elements [0, decay_numel)
  // Host-side scalars, as torch would turn them into fp32 (see FlatAdamW::step's torch-op path).
  float decay_factor = 1.f;     // 1 - lr * weight_decay
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.95f, one_minus_beta2 = 0.05f;
  float bias2_sqrt = 1.f;       // sqrt(1 - beta2^t)
  float eps = 1e-8f;
  float step_size = 0.f;        // -lr / (1 - beta1^t)
  // Device scalars, read by the kernel (null: 1 and false).
  const float* grad_scale = nullptr;  // the clip factor: the kernel uses grad * grad_scale
  const bool* skip = nullptr;         // true: leave every buffer untouched (non-finite step)
};

// One AdamW step (PyTorch's math: decoupled weight decay, bias correction). With grad_bf16 the
// update is bit for bit the one from grad = float(grad_bf16).
void adamw_step(const AdamWStep& s, cudaStream_t stream);

// buf[0, numel) = 0 (bf16) when *flag is true; nothing when false (the kernel reads the flag, so the
// host need not know it).
void zero_bf16_if(uint16_t* buf, int64_t numel, const bool* flag, cudaStream_t stream);

// grad (+)= float(model_grad), then model_grad = 0: moves one micro-batch's bf16 gradients into the
// fp32 accumulator and readies them for the next backward. overwrite: grad = float(model_grad)
// (the first micro-batch of a step, so grad needs no zeroing pass of its own).
void grads_accumulate(float* grad, uint16_t* model_grad, int64_t numel, bool overwrite, cudaStream_t stream);

}  // namespace optim
