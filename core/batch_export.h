// The exact token windows a run trains on, written for other trainers: a reference run in HF
// transformers (scripts/bench/loss-vs-hf.sh) or a notebook gets the same data in the same order
// as `flexcp train` with the same config (same DataLoader, seed and epoch permutation).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace flexcp {

// A NumPy .npy (format 1.0) image of a C-order int32 array of the given shape.
std::string npy_int32(const std::vector<int32_t>& values, int64_t rows, int64_t cols);

// Writes windows (step, sample) for step in [0, steps), sample in [0, train.global_batch), in
// that order, as an int32 array (steps * global_batch, seq_len + 1) to `path` (atomically): row r
// holds the inputs [0, seq_len) and labels [1, seq_len + 1) of one sequence. Returns the row count.
int64_t batches_export(const RunConfig& cfg, int64_t steps, const std::string& path);

}  // namespace flexcp
