#include "core/device_info.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <string>

#ifdef FLEXCP_WITH_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

namespace flexcp {

bool device_cuda_available() { return at::globalContext().hasCUDA() && at::detail::getCUDAHooks().getNumGPUs() > 0; }

#ifdef FLEXCP_WITH_TORCH_CUDA
void device_synchronize(const c10::Device& d) {
  if (d.is_cuda()) c10::cuda::device_synchronize();
}
void device_reset_peak_memory(const c10::Device& d) {
  if (d.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(d.index());
}
double device_peak_memory_bytes(const c10::Device& d) {
  if (!d.is_cuda()) return 0;
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.index());
  return static_cast<double>(stats.allocated_bytes[0].peak);  // [0] = aggregate over pools
}
double device_peak_bf16_flops(const c10::Device& d) {
  if (!d.is_cuda()) return 0;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, d.index()) != cudaSuccess) return 0;
  const std::string name = prop.name;
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989e12;
  if (name.find("A100") != std::string::npos) return 312e12;
  return 0;
}
#else
void device_synchronize(const c10::Device&) {}
void device_reset_peak_memory(const c10::Device&) {}
double device_peak_memory_bytes(const c10::Device&) { return 0; }
double device_peak_bf16_flops(const c10::Device&) { return 0; }
#endif

}  // namespace flexcp
