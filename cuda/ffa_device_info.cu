// cuda/ffa_device_info.h.
#include "cuda/ffa_device_info.h"

#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace ffa {
namespace detail {

int device_sm_count() {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) throw std::runtime_error(std::string("ffa: current device: ") + cudaGetErrorString(err));
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 = not read yet; a race reads the same value twice
  if (dev < kMaxDevices) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess || sms <= 0)
    throw std::runtime_error(std::string("ffa: SM count of device ") + std::to_string(dev) + ": " +
                             cudaGetErrorString(err));
  if (dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

}  // namespace detail
}  // namespace ffa
