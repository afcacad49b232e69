// The few device facts the trainer needs, with CPU fallbacks, so that no other file depends on
// whether LibTorch was built with CUDA.
#pragma once
#include <c10/core/Device.h>

namespace flexcp {

bool device_cuda_available();
void device_synchronize(const c10::Device& d);
void device_reset_peak_memory(const c10::Device& d);
double device_peak_memory_bytes(const c10::Device& d);  // 0 on CPU
// Dense bf16 tensor-core peak (FLOP/s) for MFU; 0 when unknown (CPU, unlisted GPUs).
double device_peak_bf16_flops(const c10::Device& d);

}  // namespace flexcp
