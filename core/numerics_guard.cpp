#include "core/numerics_guard.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/atomic_file.h"
#include "core/errors.h"
#include "core/optimizer.h"

namespace flexcp {

namespace {

std::set<int64_t> parse_inject_env() {
  std::set<int64_t> out;
  const char* v = std::getenv("FLEXCP_INJECT_NONFINITE");
  if (!v) return out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.insert(std::stoll(item));
  return out;
}

// JSON has no NaN or inf: write them as strings.
nlohmann::json number_or_text(double x) {
  if (std::isfinite(x)) return x;
  return std::isnan(x) ? "nan" : (x > 0 ? "inf" : "-inf");
}

}  // namespace

NumericsGuard::NumericsGuard(const TrainConfig& train, std::string run_dir, std::string source)
    : policy_(train.on_nonfinite),
      max_skipped_(train.max_skipped_steps),
      spike_factor_(train.spike_factor),
      run_dir_(std::move(run_dir)),
      source_(std::move(source)),
      inject_(parse_inject_env()) {}

at::Tensor NumericsGuard::nonfinite_flag(const at::Tensor& loss, const at::Tensor& grad_norm) {
  return at::logical_not(at::isfinite(loss) & at::isfinite(grad_norm.to(loss.device())));
}

void NumericsGuard::inject(FlatAdamW& opt) {
  at::NoGradGuard no_grad;
  const auto& p = opt.params().front();
  opt.grad_flat().narrow(0, p.offset, p.param.numel()).fill_(std::numeric_limits<double>::quiet_NaN());
}

std::vector<std::pair<std::string, double>> NumericsGuard::param_grad_norms(const FlatAdamW& opt) {
  std::vector<std::pair<std::string, double>> out;
  at::NoGradGuard no_grad;
  auto& grad = const_cast<FlatAdamW&>(opt).grad_flat();
  for (const auto& p : opt.params()) {
    const int64_t n = p.param.numel();
    out.push_back({p.name, grad.narrow(0, p.offset, n).norm(2).item<double>()});
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    const bool fa = std::isfinite(a.second), fb = std::isfinite(b.second);
    return fa != fb ? !fa : a.first < b.first;
  });
  return out;
}

NumericsVerdict NumericsGuard::check(int64_t step, double loss, double grad_norm,
                                     const std::vector<std::pair<int64_t, int64_t>>& samples, const FlatAdamW& opt) {
  NumericsVerdict v;
  v.finite = std::isfinite(loss) && std::isfinite(grad_norm);
  if (!v.finite) {
    const std::string what = "step " + std::to_string(step) + ": " + (std::isfinite(loss) ? "gradient norm" : "loss") +
                             " is not finite (loss " + std::to_string(loss) + ", grad norm " + std::to_string(grad_norm) + ")";
    if (policy_ != "skip") stop(step, loss, grad_norm, what, samples, opt);
    ++skipped_;
    if (skipped_ > max_skipped_)
      stop(step, loss, grad_norm, what + "; " + std::to_string(skipped_) + " steps skipped, over train.max_skipped_steps = " +
                                      std::to_string(max_skipped_), samples, opt);
    spdlog::warn("{}; update skipped ({} of at most {} skipped steps)", what, skipped_, max_skipped_);
    v.apply_update = false;
    return v;
  }
  if (spike_factor_ > 0 && seen_ >= 10 && loss > spike_factor_ * mean_) {
    v.spike = true;
    ++spikes_;
    spdlog::warn("step {}: loss spike: {:.4f} is {:.1f}x the running mean {:.4f} (train.spike_factor {})", step, loss,
                 loss / mean_, mean_, spike_factor_);
  }
  ++seen_;
  mean_ = seen_ <= 10 ? mean_ + (loss - mean_) / static_cast<double>(seen_) : 0.9 * mean_ + 0.1 * loss;
  return v;
}

void NumericsGuard::stop(int64_t step, double loss, double grad_norm, const std::string& why,
                         const std::vector<std::pair<int64_t, int64_t>>& samples, const FlatAdamW& opt) {
  nlohmann::ordered_json dump;
  dump["step"] = step;
  dump["reason"] = why;
  dump["loss"] = number_or_text(loss);
  dump["grad_norm"] = number_or_text(grad_norm);
  dump["skipped_steps"] = skipped_;
  // DataLoader::window(step, sample) is a pure function of these, so the batch can be rebuilt.
  dump["samples"] = nlohmann::ordered_json::array();
  for (const auto& [s, i] : samples) dump["samples"].push_back({{"loader_step", s}, {"sample", i}});
  dump["param_grad_norms"] = nlohmann::ordered_json::array();
  int64_t bad = 0;
  for (const auto& [name, norm] : param_grad_norms(opt)) {
    bad += !std::isfinite(norm);
    dump["param_grad_norms"].push_back({{"name", name}, {"norm", number_or_text(norm)}});
  }
  dump["nonfinite_params"] = bad;
  const std::string path = (std::filesystem::path(run_dir_) / ("nonfinite_step_" + std::to_string(step) + ".json")).string();
  write_file_atomic(path, dump.dump(1) + "\n");
  fail(source_, why + "; dump (batch ids, per-parameter gradient norms) in " + path,
       "lower train.lr, check the data of those samples, or set train.on_nonfinite: skip");
}

}  // namespace flexcp
