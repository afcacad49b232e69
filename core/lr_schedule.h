// Learning-rate schedule: linear warm-up from lr/warmup to lr over `warmup` steps, then cosine,
// linear or constant decay to min_lr at the last step.
#pragma once
#include <cstdint>

#include "core/config.h"

namespace flexcp {

// Learning rate of optimizer step `step` (0-based).
double lr_at(const TrainConfig& t, int64_t step);

}  // namespace flexcp
