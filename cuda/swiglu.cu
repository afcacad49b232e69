// Fused SwiGLU (cuda/train_kernels.h): out = silu(gate) * up, silu(g) = g * sigmoid(g), one rounding
// to bf16 at the end. The backward recomputes sigmoid from gate:
//   d_up = dout * silu(g);  d_gate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
// Each thread handles 8 elements with 16-byte accesses when the row length and strides are
// multiples of 8 and the pointers aligned, else one element (VEC = 1). Rows: gate and up may be the
// two halves of one GEMM output (row stride 2 * cols); a flat array is one row.
#include "cuda/train_common.cuh"
#include "cuda/train_kernels.h"

namespace fused {
namespace detail {
namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Element e of row r sits at r * in_stride + c in gate, up (and dgate, dup), at r * cols + c in out
// (and dout).
template <int VEC>
__global__ void swiglu_forward_kernel(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                      bf16* __restrict__ out, int64_t n, int64_t cols, int64_t in_stride) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const int64_t a = (i / cols) * in_stride + i % cols;
  float g[VEC], u[VEC], o[VEC];
  load_bf16<VEC>(gate + a, g);
  load_bf16<VEC>(up + a, u);
#pragma unroll
  for (int e = 0; e < VEC; ++e) o[e] = g[e] * sigmoid(g[e]) * u[e];
  store_bf16<VEC>(out + i, o);
}

template <int VEC>
__global__ void swiglu_backward_kernel(const bf16* __restrict__ dout, const bf16* __restrict__ gate,
                                       const bf16* __restrict__ up, bf16* __restrict__ dgate, bf16* __restrict__ dup,
                                       int64_t n, int64_t cols, int64_t in_stride) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const int64_t a = (i / cols) * in_stride + i % cols;
  float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
  load_bf16<VEC>(dout + i, d);
  load_bf16<VEC>(gate + a, g);
  load_bf16<VEC>(up + a, u);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float s = sigmoid(g[e]);
    du[e] = d[e] * g[e] * s;
    dg[e] = d[e] * u[e] * s * (1.f + g[e] * (1.f - s));
  }
  store_bf16<VEC>(dgate + a, dg);
  store_bf16<VEC>(dup + a, du);
}

constexpr int kBlock = 256;

unsigned grid_for(int64_t n, int vec) {
  const int64_t threads = (n + vec - 1) / vec;
  return static_cast<unsigned>((threads + kBlock - 1) / kBlock);
}

}  // namespace
}  // namespace detail

void swiglu_forward(const void* gate, const void* up, void* out, int64_t n, cudaStream_t stream) {
  swiglu_forward_rows(gate, up, n, out, 1, n, stream);
}

void swiglu_backward(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     cudaStream_t stream) {
  swiglu_backward_rows(dout, gate, up, n, dgate, dup, 1, n, stream);
}

void swiglu_forward_rows(const void* gate, const void* up, int64_t in_stride, void* out, int64_t rows, int64_t cols,
                         cudaStream_t stream) {
  using namespace detail;
  const int64_t n = rows * cols;
  if (n == 0) return;
  const auto* g = static_cast<const bf16*>(gate);
  const auto* u = static_cast<const bf16*>(up);
  auto* o = static_cast<bf16*>(out);
  if (cols % 8 == 0 && in_stride % 8 == 0 && aligned16(gate) && aligned16(up) && aligned16(out))
    swiglu_forward_kernel<8><<<grid_for(n, 8), kBlock, 0, stream>>>(g, u, o, n, cols, in_stride);
  else
    swiglu_forward_kernel<1><<<grid_for(n, 1), kBlock, 0, stream>>>(g, u, o, n, cols, in_stride);
  launch_check("swiglu_forward");
}

void swiglu_backward_rows(const void* dout, const void* gate, const void* up, int64_t in_stride, void* dgate, void* dup,
                          int64_t rows, int64_t cols, cudaStream_t stream) {
  using namespace detail;
  const int64_t n = rows * cols;
  if (n == 0) return;
  const auto* d = static_cast<const bf16*>(dout);
  const auto* g = static_cast<const bf16*>(gate);
  const auto* u = static_cast<const bf16*>(up);
  auto* dg = static_cast<bf16*>(dgate);
  auto* du = static_cast<bf16*>(dup);
  if (cols % 8 == 0 && in_stride % 8 == 0 && aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) &&
      aligned16(dup))
    swiglu_backward_kernel<8><<<grid_for(n, 8), kBlock, 0, stream>>>(d, g, u, dg, du, n, cols, in_stride);
  else
    swiglu_backward_kernel<1><<<grid_for(n, 1), kBlock, 0, stream>>>(d, g, u, dg, du, n, cols, in_stride);
  launch_check("swiglu_backward");
}

}  // namespace fused
