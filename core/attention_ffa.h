// The `ffa` attention kernel: our CUDA flexible flash attention (cuda/ffa.h) behind the
// AttentionKernel interface. Defined in attention_ffa_cuda.cpp, built only with CUDA LibTorch.
#pragma once
#include <memory>

#include "core/attention_backend.h"

namespace flexcp {

struct FfaOptions {
  // Fixed reduction order in the backward (parallel.deterministic): dQ by its own pass, no atomics.
  bool deterministic = false;
};

// Default options; FLEXCP_FFA_DETERMINISTIC=1 in the environment turns the deterministic mode on.
std::shared_ptr<AttentionKernel> make_ffa_kernel();
std::shared_ptr<AttentionKernel> make_ffa_kernel(const FfaOptions& opts);
}  // namespace flexcp
