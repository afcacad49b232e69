// Where the time of one training step goes. For the step chosen with `flexcp train --profile-step N`
// the trainer marks the end of each phase (forward, loss, backward, ...); on CUDA the marks are
// events on the current stream, so they cost no host sync until the step's report, and the step is
// bracketed by cudaProfilerStart/Stop so that `ncu --profile-from-start off` records only its
// kernels (scripts/bench/train-vs-hf.sh --breakdown). On CPU the marks read the wall clock.
#pragma once
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace flexcp {

class StepProfiler {
 public:
  StepProfiler(const c10::Device& device, int64_t profile_step);  // profile_step 0 = off
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // Starts timing when step (1-based) is the chosen one; every other call is a no-op.
  void begin(int64_t step);
  // Ends the phase that ran since the previous mark (or begin). Phases with the same name add up.
  void mark(const char* phase);
  // Waits for the step's work, stops timing; returns per-phase milliseconds in first-seen order
  // (empty when this step was not profiled).
  std::vector<std::pair<std::string, double>> end();

 private:
  struct Marks;
  c10::Device device_;
  int64_t profile_step_;
  bool active_ = false;
  std::unique_ptr<Marks> marks_;
};

// "forward 81.2 ms (25%) | backward ... | total 322.0 ms"
std::string step_profile_format(const std::vector<std::pair<std::string, double>>& phases);

}  // namespace flexcp
