// The `ffa` attention kernel: our CUDA flexible flash attention (cuda/ffa.h) behind the
// AttentionKernel interface. Defined in attention_ffa_cuda.cpp, built only with CUDA LibTorch.
#pragma once
#include <memory>

#include "core/attention_backend.h"

namespace flexcp {
std::shared_ptr<AttentionKernel> make_ffa_kernel();
}  // namespace flexcp
