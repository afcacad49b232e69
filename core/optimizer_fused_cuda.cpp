// FlatAdamW's fused passes: LibTorch tensors to cuda/optim.h's raw pointers, on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/optimizer_fused.h"
#include "cuda/optim.h"

namespace flexcp {
namespace {

void check_flat(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "fused optimizer: ", what, " must be a contiguous CUDA ", c10::toString(dtype), " tensor of ", numel,
              " elements");
}

uint16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

void fused_adamw_step(at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& grad,
                      const at::Tensor& model, int64_t decay_numel, const AdamWScalars& s,
                      const at::Tensor& grad_scale, const at::Tensor& skip) {
  const int64_t n = master.numel();
  check_flat(master, at::kFloat, n, "master");
  check_flat(exp_avg, at::kFloat, n, "exp_avg");
  check_flat(exp_avg_sq, at::kFloat, n, "exp_avg_sq");
  const bool bf16_grad = grad.scalar_type() == at::kBFloat16;
  check_flat(grad, bf16_grad ? at::kBFloat16 : at::kFloat, n, "grad");
  if (model.defined()) check_flat(model, at::kBFloat16, n, "model");
  if (grad_scale.defined()) check_flat(grad_scale, at::kFloat, 1, "grad_scale");
  if (skip.defined()) check_flat(skip, at::kBool, 1, "skip");
  c10::cuda::CUDAGuard guard(master.device());
  optim::AdamWStep a;
  a.master = master.data_ptr<float>();
  a.exp_avg = exp_avg.data_ptr<float>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  if (bf16_grad)
    a.grad_bf16 = bf16_ptr(grad);
  else
    a.grad = grad.data_ptr<float>();
  a.model = model.defined() ? bf16_ptr(model) : nullptr;
  a.numel = n;
  a.decay_numel = decay_numel;
  a.decay_factor = static_cast<float>(s.decay_factor);
  a.beta1 = static_cast<float>(s.beta1);
  a.one_minus_beta1 = static_cast<float>(s.one_minus_beta1);
  a.beta2 = static_cast<float>(s.beta2);
  a.one_minus_beta2 = static_cast<float>(s.one_minus_beta2);
  a.bias2_sqrt = static_cast<float>(s.bias2_sqrt);
  a.eps = static_cast<float>(s.eps);
  a.step_size = static_cast<float>(s.step_size);
  a.grad_scale = grad_scale.defined() ? grad_scale.data_ptr<float>() : nullptr;
  a.skip = skip.defined() ? skip.data_ptr<bool>() : nullptr;
  optim::adamw_step(a, at::cuda::getCurrentCUDAStream());
}

void fused_grads_accumulate(at::Tensor& grad, at::Tensor& model_grad, bool overwrite) {
  const int64_t n = grad.numel();
  const bool bf16_grad = grad.scalar_type() == at::kBFloat16;
  check_flat(grad, bf16_grad ? at::kBFloat16 : at::kFloat, n, "grad");
  check_flat(model_grad, at::kBFloat16, n, "model_grad");
  c10::cuda::CUDAGuard guard(grad.device());
  optim::grads_accumulate(grad.data_ptr<float>(), bf16_ptr(model_grad), n, overwrite, at::cuda::getCurrentCUDAStream());
}

void fused_zero_if(at::Tensor& buf, const at::Tensor& flag) {
  check_flat(buf, at::kBFloat16, buf.numel(), "buf");
  check_flat(flag, at::kBool, 1, "flag");
  c10::cuda::CUDAGuard guard(buf.device());
  optim::zero_bf16_if(bf16_ptr(buf), buf.numel(), flag.data_ptr<bool>(), at::cuda::getCurrentCUDAStream());
}

}  // namespace flexcp
