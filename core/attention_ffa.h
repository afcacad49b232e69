// The `ffa` attention kernel: our CUDA flexible flash attention (cuda/ffa.h) behind the
// AttentionKernel interface. Defined in attention_ffa_cuda.cpp, built only with CUDA LibTorch.
#pragma once
#include <memory>

#include "core/attention_backend.h"

namespace flexcp {

struct FfaOptions {
  // Fixed reduction order in the backward (parallel.deterministic): dQ by its own pass, no atomics.
  bool deterministic = false;
  // cuda/ffa.h kernel variants (ForwardArgs::kernel, BackwardArgs::kernel); docs/kernel-log.md "v8" and
  // "v8-bwd", "v10": forward 5 (v8's 192-row q tiles at D=64 and 3 consumer warpgroups, on a
  // persistent grid) and backward 5 (consumers out of lockstep, dQ writer warps) were the fastest on the
  // H100 (docs/performance.md).
  int forward_kernel = 5;
  int backward_kernel = 5;
};

// Default options; the environment may override them: FLEXCP_FFA_DETERMINISTIC=1,
// FLEXCP_FFA_FWD_KERNEL=n, FLEXCP_FFA_BWD_KERNEL=n (to time one kernel variant against another).
std::shared_ptr<AttentionKernel> make_ffa_kernel();
std::shared_ptr<AttentionKernel> make_ffa_kernel(const FfaOptions& opts);
}  // namespace flexcp
