// Resource errors at the CLI boundary: out of memory (GPU or host) becomes one line with the numbers
// and what to change; a config that needs a GPU or NCCL on a machine or build without them is caught
// before training starts.
#pragma once
#include <cstdint>
#include <exception>
#include <string>

#include "core/config.h"

namespace flexcp {

// True for LibTorch's allocation failures: CUDA's "CUDA out of memory" (c10::OutOfMemoryError in
// torch 2.x, c10::Error in 1.13) and the CPU allocator's "can't allocate memory".
bool is_out_of_memory(const std::exception& e);

// The one-line message for an out-of-memory error `torch_message` during training with `cfg`:
// the sizes torch reported (tried to allocate, total capacity, already allocated, free), the
// config's micro-batch, sequence length, activation checkpointing and cp size, and what to change.
std::string out_of_memory_message(const RunConfig& cfg, int64_t world_size, const std::string& torch_message);

// Throws UserError when the config needs what this machine or build lacks: a CUDA GPU
// (train.device: cuda), NCCL (parallel.communicator: nccl, or auto on GPU with several processes),
// or MPI (communicator: mpi, or auto on CPU with several processes).
void check_runtime_resources(const RunConfig& cfg, int64_t world_size, bool cuda_available);

}  // namespace flexcp
