// Checkpoints: one folder per step, written whole or not at all.
//
//   <dir>/step_00000100/model.safetensors      fp32 master weights under HF names (exportable)
//                       optimizer.safetensors  AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
//                       state.json             step, optimizer steps, config hash, data cursor
//
// A checkpoint is assembled in a temporary sibling folder, every file fsynced, then renamed into
// place and the parent fsynced, so a crash leaves either the previous set or the new one complete.
// Only folders named step_* with a state.json are checkpoints; leftovers of a crash are ignored
// and cleaned up by the next save.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/safetensors.h"

namespace flexcp {

struct CheckpointContents {
  std::string path;
  int64_t step = 0;  // optimizer steps completed
  nlohmann::json state;
  std::map<std::string, at::Tensor> model;      // HF name -> tensor (CPU)
  std::map<std::string, at::Tensor> optimizer;  // exp_avg.* / exp_avg_sq.* (CPU)
};

// Saves a checkpoint for `step` and prunes all but the newest `keep_last` (0 keeps all).
// Returns the folder written.
std::string checkpoint_save(const std::string& dir, int64_t step, const NamedTensors& model,
                            const NamedTensors& optimizer, const nlohmann::json& state, int64_t keep_last);

// Newest complete checkpoint folder in `dir`, or "" when there is none.
std::string checkpoint_find_latest(const std::string& dir);

// The step recorded in a checkpoint folder's state.json (reads nothing else).
int64_t checkpoint_load_step(const std::string& path);

// Loads a checkpoint folder; throws UserError naming the file when anything is missing or corrupt.
CheckpointContents checkpoint_load(const std::string& path);

}  // namespace flexcp
