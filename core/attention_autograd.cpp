// backend_from_kernel: a differentiable attention op over any AttentionKernel.
#include <torch/autograd.h>

#include <mutex>
#include <vector>

#include "core/attention_backend.h"
#include "core/attention_blocks.h"

namespace flexcp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The spec travels through autograd's saved data as an int64 tensor: one row (qs, qe, ks, ke, mask)
// per slice, plus a header row (num_q, num_k, 0, 0, 0).
at::Tensor spec_to_tensor(const AttentionSpec& spec) {
  auto t = at::empty({static_cast<int64_t>(spec.slices.size()) + 1, 5}, at::kLong);
  auto a = t.accessor<int64_t, 2>();
  a[0][0] = spec.num_q; a[0][1] = spec.num_k; a[0][2] = a[0][3] = a[0][4] = 0;
  for (size_t n = 0; n < spec.slices.size(); ++n) {
    const auto& s = spec.slices[n];
    a[n + 1][0] = s.q.start; a[n + 1][1] = s.q.end; a[n + 1][2] = s.k.start; a[n + 1][3] = s.k.end;
    a[n + 1][4] = static_cast<int64_t>(s.mask);
  }
  return t;
}

AttentionSpec spec_from_tensor(const at::Tensor& t) {
  auto a = t.accessor<int64_t, 2>();
  AttentionSpec spec;
  spec.num_q = a[0][0];
  spec.num_k = a[0][1];
  for (int64_t n = 1; n < t.size(0); ++n)
    spec.slices.push_back({{a[n][0], a[n][1]}, {a[n][2], a[n][3]}, static_cast<MaskType>(a[n][4])});
  return spec;
}

struct KernelAttention : public torch::autograd::Function<KernelAttention> {
  // Autograd's saved data cannot hold a shared_ptr, so the node keeps a raw pointer; kernels handed to
  // backend_from_kernel are kept alive for the life of the process (see kernels_kept_alive), so a
  // graph may outlive the backend that built it.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            AttentionKernel* kernel, const AttentionSpec* spec, double scale) {
    auto res = kernel->forward(q, k, v, *spec, scale);
    ctx->save_for_backward({q, k, v, res.out, res.lse});
    ctx->saved_data["kernel"] = reinterpret_cast<int64_t>(kernel);
    ctx->saved_data["spec"] = spec_to_tensor(*spec);
    ctx->saved_data["scale"] = scale;
    return res.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto* kernel = reinterpret_cast<AttentionKernel*>(ctx->saved_data["kernel"].toInt());
    const auto spec = spec_from_tensor(ctx->saved_data["spec"].toTensor());
    auto g = kernel->backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], spec,
                              ctx->saved_data["scale"].toDouble());
    return {g.dq, g.dk, g.dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class KernelBackend final : public AttentionBackend {
 public:
  explicit KernelBackend(std::shared_ptr<AttentionKernel> kernel) : kernel_(std::move(kernel)) {}
  std::string name() const override { return kernel_->name(); }
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                    double scale) override {
    return KernelAttention::apply(q, k, v, kernel_.get(), &spec, scale);
  }

 private:
  std::shared_ptr<AttentionKernel> kernel_;
};

}  // namespace

std::shared_ptr<AttentionBackend> backend_from_kernel(std::shared_ptr<AttentionKernel> kernel) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<AttentionKernel>> kernels_kept_alive;  // a few per process
  {
    std::lock_guard<std::mutex> lock(mutex);
    kernels_kept_alive.push_back(kernel);
  }
  return std::make_shared<KernelBackend>(std::move(kernel));
}

}  // namespace flexcp
