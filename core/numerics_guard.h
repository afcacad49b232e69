// Numerics checks of the training loop: non-finite loss or gradient norm, and loss spikes.
//
// A non-finite step must not reach the weights (AdamW's moments would be poisoned), yet reading the
// loss and norm before the update would stall the GPU on a host sync. So the decision is made twice
// from the same values: on the device (nonfinite_flag, which the optimizer step reads to drop the
// update), and on the host by check() once the trainer reads the values at the end of the step, for
// the skip counter, the stop with its dump, spikes and the log.
//
// Policy (train.on_nonfinite): "stop" writes <run dir>/nonfinite_step_<N>.json (loss, norm, the
// batch's (step, sample) ids, each parameter's gradient norm, non-finite ones first) and ends the run
// with an error; "skip" drops the update (weights, moments and the optimizer's step count stay as they
// were) and counts it; more than train.max_skipped_steps skipped steps in a run stop it as above.
// Loss spikes (loss > train.spike_factor x the running mean of earlier finite losses) are logged.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace flexcp {

class FlatAdamW;

struct NumericsVerdict {
  bool finite = true;        // loss and gradient norm are both finite
  bool apply_update = true;  // run the optimizer step
  bool spike = false;        // loss spike (logged; the step is applied)
};

class NumericsGuard {
 public:
  NumericsGuard(const TrainConfig& train, std::string run_dir, std::string source);

  // Test hook: the environment variable FLEXCP_INJECT_NONFINITE="3,5" makes the trainer poison the
  // gradients of those steps (1-based) with NaN, so the tests exercise the real path.
  bool inject_due(int64_t step) const { return inject_.count(step) != 0; }
  // Fills the gradient of the first parameter with NaN (one bad layer, as in a real blow-up).
  static void inject(FlatAdamW& opt);

  // Bool scalar on the device: loss or gradient norm not finite. The optimizer drops the update when
  // it is true; check() then says apply_update = false for the same values.
  static at::Tensor nonfinite_flag(const at::Tensor& loss, const at::Tensor& grad_norm);

  // One step's decision. `step` is 1-based; `samples` the (loader step, sample) ids of this rank's
  // windows (DataLoader::window's arguments; the loader step is step - 1),
  // `opt` gives the per-parameter gradient norms for the dump. Throws UserError (naming the dump
  // file) when the run must stop.
  NumericsVerdict check(int64_t step, double loss, double grad_norm,
                        const std::vector<std::pair<int64_t, int64_t>>& samples, const FlatAdamW& opt);

  int64_t skipped() const { return skipped_; }
  void set_skipped(int64_t n) { skipped_ = n; }  // from a checkpoint
  int64_t spikes() const { return spikes_; }

  // Per-parameter gradient norms of `opt`, non-finite ones first (then by name). Used for the dump.
  static std::vector<std::pair<std::string, double>> param_grad_norms(const FlatAdamW& opt);

 private:
  [[noreturn]] void stop(int64_t step, double loss, double grad_norm, const std::string& why,
                         const std::vector<std::pair<int64_t, int64_t>>& samples, const FlatAdamW& opt);

  std::string policy_;
  int64_t max_skipped_ = 0;
  double spike_factor_ = 0;
  std::string run_dir_, source_;
  std::set<int64_t> inject_;
  int64_t skipped_ = 0, spikes_ = 0;
  double mean_ = 0;      // running mean of finite losses (exponential, alpha = 0.1, after a plain mean of the first 10)
  int64_t seen_ = 0;
};

}  // namespace flexcp
