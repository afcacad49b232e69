// Attention back-ends. The model calls an AttentionBackend (differentiable) with q, k, v and a spec;
// it never knows which kernels run or whether context parallelism is on.
//
// Layout (docs/attention-spec.md): q (Tq, Hq, D), k and v (Tk, Hkv, D), out (Tq, Hq, D) in the
// dtype of q, lse (Tq, Hq) in fp32 (natural log). Rows with no visible key: out 0, lse -inf.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "core/attention_spec.h"

namespace flexcp {

struct AttnForward {
  at::Tensor out;
  at::Tensor lse;
};

struct AttnGrads {
  at::Tensor dq, dk, dv;
};

// A kernel computes attention over a spec, forward and backward, with no autograd. Context
// parallelism composes kernels (local stage, remote stages, merge); backend_from_kernel wraps one
// into a differentiable backend. dk/dv are summed over the query heads of each GQA group.
class AttentionKernel {
 public:
  virtual ~AttentionKernel() = default;
  virtual std::string name() const = 0;
  virtual AttnForward forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const AttentionSpec& spec, double scale) = 0;
  virtual AttnGrads backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const AttentionSpec& spec, double scale) = 0;
  // Merges `part`, a partial result for the same queries over other keys, into `acc`
  // (attention-spec.md, "Merging"); math in fp32. acc.out keeps its dtype when acc.out and part.out
  // share one, else it becomes fp32. The base version runs torch ops (cp_attention.cpp); a kernel
  // may override it with one fused pass (ffa).
  virtual void merge_into(AttnForward& acc, const AttnForward& part);
};

// What the model calls. Returns out (Tq, Hq, D), differentiable with respect to q, k and v.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::string name() const = 0;
  virtual at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionSpec& spec, double scale) = 0;
};

// Differentiable wrapper around a kernel: forward saves q, k, v, out, lse; backward calls
// kernel->backward. The backend keeps the kernel alive for as long as any graph that used it.
std::shared_ptr<AttentionBackend> backend_from_kernel(std::shared_ptr<AttentionKernel> kernel);

// The fp32 reference kernel: exact math for any spec, on any device (inputs are upcast to fp32,
// results cast back to the input dtype). Memory is O(Hq * Tq * Tk): for tests and small models.
std::shared_ptr<AttentionKernel> make_reference_kernel();

// By name: "reference", "torch" (SDPA where the LibTorch version has it), "ffa" (our CUDA kernels;
// only in CUDA builds). Throws UserError for an unknown or unavailable name.
std::shared_ptr<AttentionBackend> make_attention_backend(const std::string& name);
std::shared_ptr<AttentionKernel> make_attention_kernel(const std::string& name);

// Dense boolean visibility mask (Tq, Tk) of a spec, on `device`. For references and fallbacks.
at::Tensor spec_dense_mask(const AttentionSpec& spec, const at::Device& device);

}  // namespace flexcp
