#include "core/step_profiler.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#ifdef FLEXCP_WITH_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>
#endif

namespace flexcp {

// One mark = (phase name, a CUDA event or a wall-clock time); the first mark is the step's start.
struct StepProfiler::Marks {
  std::vector<std::string> names;
  std::vector<std::chrono::steady_clock::time_point> wall;
#ifdef FLEXCP_WITH_TORCH_CUDA
  std::vector<cudaEvent_t> events;
#endif
};

StepProfiler::StepProfiler(const c10::Device& device, int64_t profile_step)
    : device_(device), profile_step_(profile_step), marks_(std::make_unique<Marks>()) {}

StepProfiler::~StepProfiler() {
#ifdef FLEXCP_WITH_TORCH_CUDA
  for (auto e : marks_->events) cudaEventDestroy(e);
#endif
}

void StepProfiler::begin(int64_t step) {
  active_ = profile_step_ > 0 && step == profile_step_;
  if (!active_) return;
#ifdef FLEXCP_WITH_TORCH_CUDA
  if (device_.is_cuda()) {
    cudaDeviceSynchronize();  // the previous step's tail must not count here
    cudaProfilerStart();
  }
#endif
  mark("");
}

void StepProfiler::mark(const char* phase) {
  if (!active_) return;
  marks_->names.emplace_back(phase);
#ifdef FLEXCP_WITH_TORCH_CUDA
  if (device_.is_cuda()) {
    cudaEvent_t e = nullptr;
    cudaEventCreate(&e);
    cudaEventRecord(e, c10::cuda::getCurrentCUDAStream(device_.index()).stream());
    marks_->events.push_back(e);
    return;
  }
#endif
  marks_->wall.push_back(std::chrono::steady_clock::now());
}

std::vector<std::pair<std::string, double>> StepProfiler::end() {
  std::vector<std::pair<std::string, double>> out;
  if (!active_) return out;
  active_ = false;
  const size_t n = marks_->names.size();
  std::vector<double> at_ms(n, 0.0);
#ifdef FLEXCP_WITH_TORCH_CUDA
  if (device_.is_cuda()) {
    cudaDeviceSynchronize();
    cudaProfilerStop();
    for (size_t i = 1; i < n; ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, marks_->events[0], marks_->events[i]);
      at_ms[i] = ms;
    }
  }
#endif
  if (!marks_->wall.empty())
    for (size_t i = 1; i < n; ++i)
      at_ms[i] = std::chrono::duration<double, std::milli>(marks_->wall[i] - marks_->wall[0]).count();
  for (size_t i = 1; i < n; ++i) {
    const double ms = at_ms[i] - at_ms[i - 1];
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& p) { return p.first == marks_->names[i]; });
    if (it == out.end()) out.push_back({marks_->names[i], ms});
    else it->second += ms;
  }
  return out;
}

std::string step_profile_format(const std::vector<std::pair<std::string, double>>& phases) {
  double total = 0;
  for (const auto& p : phases) total += p.second;
  std::string s;
  for (const auto& [name, ms] : phases)
    s += fmt::format("{} {:.1f} ms ({:.0f}%) | ", name, ms, total > 0 ? 100 * ms / total : 0.0);
  return s + fmt::format("total {:.1f} ms", total);
}

}  // namespace flexcp
