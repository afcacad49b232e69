// Merge of two partial (out, lse) results for the same rows, in fp32 (attention-spec.md, "Merging").
// One warp per (token, head): every lane reads both lse values before lane 0 writes the merged one,
// so out/lse may alias o1/lse1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "cuda/ffa_kernels.h"
#include "cuda/ffa_launch.cuh"

namespace ffa {
namespace detail {
namespace {

template <typename T>
__device__ __forceinline__ float ld(const T* p);
template <>
__device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void st(float* p, float x) { *p = x; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void st(__half* p, float x) { *p = __float2half_rn(x); }

template <typename T>
__global__ void merge_kernel(const MergeParams p) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= p.num_tokens * p.heads) return;
  const int64_t t = w / p.heads;
  const int h = static_cast<int>(w % p.heads);
  const float l1 = p.lse1[t * p.l1_st + h * p.l1_sh];
  const float l2 = p.lse2[t * p.l2_st + h * p.l2_sh];
  const float mx = fmaxf(l1, l2);
  float w1 = 0.f, w2 = 0.f, lse = -INFINITY;
  if (mx != -INFINITY) {  // at least one part saw keys; exp(-inf - finite) = 0 handles the other
    const float e1 = __expf(l1 - mx), e2 = __expf(l2 - mx);
    lse = mx + __logf(e1 + e2);
    w1 = __expf(l1 - lse);
    w2 = __expf(l2 - lse);
  }
  const T* o1 = static_cast<const T*>(p.o1) + t * p.o1_st + h * p.o1_sh;
  const T* o2 = static_cast<const T*>(p.o2) + t * p.o2_st + h * p.o2_sh;
  T* out = static_cast<T*>(p.out) + t * p.out_st + h * p.out_sh;
  for (int d = lane; d < p.head_dim; d += 32) {
    // A part with weight 0 is not read: its out may be garbage (e.g. never written).
    const float a = w1 != 0.f ? w1 * ld<T>(o1 + d) : 0.f;
    const float b = w2 != 0.f ? w2 * ld<T>(o2 + d) : 0.f;
    st(out + d, a + b);
  }
  __syncwarp();
  if (lane == 0) p.lse[t * p.l_st + h * p.l_sh] = lse;
}

template <typename T>
void launch_t(const MergeParams& p, cudaStream_t stream) {
  const int64_t threads = p.num_tokens * p.heads * 32;
  if (threads == 0) return;
  launch_checked("ffa merge", merge_kernel<T>, (threads + 255) / 256, 256, 0, stream, p);
}

}  // namespace

void launch_merge(int dtype, const MergeParams& p, cudaStream_t stream) {
  if (dtype == 0) return launch_t<__nv_bfloat16>(p, stream);
  if (dtype == 1) return launch_t<__half>(p, stream);
  if (dtype == 2) return launch_t<float>(p, stream);
  throw std::runtime_error("ffa merge: unsupported dtype");
}

}  // namespace detail
}  // namespace ffa
