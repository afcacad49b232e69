// Attention back-ends by name, as `parallel.attention` in the YAML names them.
#include "core/attention_backend.h"
#include "core/errors.h"
#if defined(FLEXCP_WITH_TORCH_CUDA) && defined(FLEXCP_WITH_FFA)
#include "core/attention_ffa.h"
#endif

namespace flexcp {

std::shared_ptr<AttentionBackend> make_torch_backend();  // attention_torch.cpp

std::shared_ptr<AttentionKernel> make_attention_kernel(const std::string& name) {
  if (name == "reference") return make_reference_kernel();
  if (name == "ffa") {
#if defined(FLEXCP_WITH_TORCH_CUDA) && defined(FLEXCP_WITH_FFA)
    return make_ffa_kernel();
#else
    fail("parallel.attention", "'ffa' needs a CUDA build of flexcp (this one is CPU-only)",
         "use attention: reference or torch, or build on a machine with CUDA LibTorch");
#endif
  }
  if (name == "torch")
    fail("parallel.attention", "'torch' has no separate forward/backward kernel (context parallelism needs one)",
         "use attention: reference (CPU) or ffa (GPU) with cp > 1");
  fail("parallel.attention", "unknown attention backend '" + name + "'", "choose reference, torch or ffa");
}

std::shared_ptr<AttentionBackend> make_attention_backend(const std::string& name) {
  if (name == "torch") return make_torch_backend();
  return backend_from_kernel(make_attention_kernel(name));
}

}  // namespace flexcp
