// The training loop: model, data, optimizer, schedule, checkpoints and metrics for one run.
#pragma once
#include <cstdint>
#include <string>

#include "core/config.h"

namespace flexcp {

struct TrainOptions {
  bool resume = false;          // continue from the newest complete checkpoint in checkpoint.dir
  std::string resume_from;      // or from this checkpoint folder
  std::string config_text;      // the resolved config as YAML, saved into the run folder
  int64_t profile_step = 0;     // time this step (1-based) by phase and bracket it for ncu; 0 = off
};

// Runs the whole training described by cfg. Throws UserError on bad input. Returns the process exit
// code (0 on success).
int train_run(const RunConfig& cfg, const TrainOptions& opts);

}  // namespace flexcp
