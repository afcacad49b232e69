// The fused ops where they cannot exist: a build without CUDA LibTorch and our kernels. Every op
// "does not apply", so the model runs its torch composites. The CUDA build compiles
// fused_ops_cuda.cpp instead (same condition as the _cuda.cpp suffix rule in core/CMakeLists.txt).
#include "core/fused_ops.h"

#if !(defined(FLEXCP_WITH_TORCH_CUDA) && defined(FLEXCP_WITH_FFA))

namespace flexcp {

bool fused_ops_enabled() { return false; }
void fused_ops_set_enabled(bool) {}

at::Tensor fused_rmsnorm(const at::Tensor&, const at::Tensor&, double) { return {}; }

std::pair<at::Tensor, at::Tensor> fused_add_rmsnorm(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) {
  return {};
}

std::pair<at::Tensor, at::Tensor> fused_rope(const at::Tensor&, const at::Tensor&, const RopeCosSin&) { return {}; }

at::Tensor fused_swiglu(const at::Tensor&, const at::Tensor&) { return {}; }

at::Tensor fused_linear(const at::Tensor&, const at::Tensor&) { return {}; }

std::vector<at::Tensor> fused_qkv_rope(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const RopeCosSin&, int64_t, int64_t, int64_t) {
  return {};
}

at::Tensor fused_gate_up_swiglu(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }

at::Tensor fused_cross_entropy_sum(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t) {
  return {};
}

}  // namespace flexcp

#endif
