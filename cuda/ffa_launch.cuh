// Host-side launch plumbing shared by the attention kernels: the runtime (dtype, head_dim) pair picks one
// of the four compiled (element type, D) instantiations, and a launch raises its smem limit and checks
// for errors the same way everywhere. Host code only; nothing here reaches the device code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace ffa {
namespace detail {

// The compile-time values dispatch_dtype_dim hands its callback. A launcher template that takes them
// as parameters, `template <typename T, int D> void launch_x(TypeTag<T>, DimTag<D>, ...)`, deduces T
// and D from them, so the callback is a one-line forward: `[&](auto t, auto d) { launch_x(t, d, ...); }`.
template <typename T>
struct TypeTag {
  using type = T;
};
template <int D>
using DimTag = std::integral_constant<int, D>;

// Calls fn(TypeTag<T>{}, DimTag<D>{}) for dtype 0 = bf16, 1 = fp16 (DType values) and head_dim 64 or
// 128: exactly these four instantiations of fn, no more. Anything else throws, naming `kernel_name`.
template <typename Fn>
void dispatch_dtype_dim(const char* kernel_name, int dtype, int head_dim, Fn&& fn) {
  if (dtype == 0 && head_dim == 64) return fn(TypeTag<__nv_bfloat16>{}, DimTag<64>{});
  if (dtype == 0 && head_dim == 128) return fn(TypeTag<__nv_bfloat16>{}, DimTag<128>{});
  if (dtype == 1 && head_dim == 64) return fn(TypeTag<__half>{}, DimTag<64>{});
  if (dtype == 1 && head_dim == 128) return fn(TypeTag<__half>{}, DimTag<128>{});
  throw std::runtime_error(std::string(kernel_name) + ": unsupported dtype/head_dim: dtype " + std::to_string(dtype) +
                           " (supported: 0 = bf16, 1 = fp16), head_dim " + std::to_string(head_dim) +
                           " (supported: 64, 128)");
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) on a 1-D grid (the caller keeps it non-empty and
// within 2^31 - 1 blocks). With dynamic shared memory, the kernel's limit is raised to `smem` first (past
// 48 KiB a launch fails without it). Errors throw "<name>: <cuda error>" (the attribute) or
// "<name> launch: <cuda error>".
template <typename... Params, typename... Args>
void launch_checked(const char* name, void (*kernel)(Params...), int64_t grid, int block, int smem,
                    cudaStream_t stream, Args&&... args) {
  cudaError_t err = cudaSuccess;
  if (smem > 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(err));
  }
  kernel<<<static_cast<unsigned>(grid), block, smem, stream>>>(std::forward<Args>(args)...);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(name) + " launch: " + cudaGetErrorString(err));
}

}  // namespace detail
}  // namespace ffa
