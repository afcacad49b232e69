// Properties of the current CUDA device that launches need, read once per device.
#pragma once

namespace ffa {
namespace detail {

// Streaming multiprocessors of the current device (cached per device): the grid size of the persistent
// kernels (backward kernel 5 under FFA_BWD_PERSISTENT; the forward's kernel 5 has its own copy, sm_count()
// in cuda/ffa_fwd_overlap.cu, which can switch to this one). Throws std::runtime_error if CUDA fails.
int device_sm_count();

}  // namespace detail
}  // namespace ffa
