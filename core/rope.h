// Rotary position embeddings as HF transformers computes them for Llama, including the Llama 3.1
// frequency scaling (rope_type "llama3"). HF rotates the (first half, second half) pairs of each
// head: rotate_half(x) = cat(-x[D/2:], x[:D/2]); cos and sin repeat the D/2 frequencies twice.
#pragma once
#include <ATen/core/Tensor.h>

#include "core/llama_arch.h"

namespace flexcp {

// Inverse frequencies (head_dim / 2,) in fp32 on the CPU, computed in fp32 exactly as HF's
// _compute_default_rope_parameters / _compute_llama3_parameters (so that cos/sin match to the ulp).
// Throws UserError for an unknown scaling type or inconsistent llama3 factors.
at::Tensor rope_inv_freq(const LlamaArch& arch);

struct RopeCosSin {
  at::Tensor cos;  // (T, head_dim) fp32
  at::Tensor sin;  // (T, head_dim) fp32
};

// cos/sin for integer `positions` (T,) on the device of `positions`; `inv_freq` from rope_inv_freq.
RopeCosSin rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions);

// x (T, H, D) -> x * cos + rotate_half(x) * sin, in x's dtype (cos/sin are cast to it first, as HF
// does). Differentiable through ordinary ATen ops.
at::Tensor rope_apply(const at::Tensor& x, const RopeCosSin& cs);

}  // namespace flexcp
