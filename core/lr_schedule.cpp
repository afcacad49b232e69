#include "core/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace flexcp {

double lr_at(const TrainConfig& t, int64_t step) {
  if (step < t.warmup) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup);
  if (t.schedule == "constant") return t.lr;
  const int64_t decay_steps = std::max<int64_t>(1, t.steps - t.warmup - 1);
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup) / static_cast<double>(decay_steps));
  if (t.schedule == "linear") return t.lr - (t.lr - t.min_lr) * progress;
  return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(M_PI * progress));  // cosine
}

}  // namespace flexcp
