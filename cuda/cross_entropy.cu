// Cross-entropy over one chunk of bf16 logits (cuda/train_kernels.h), one block per row:
//   pass 1: every thread keeps a running (max, sum of exp(x - max)) over its elements; the block
//           combines them into logsumexp (fp32);
//   pass 2: (write_grad only) the row is overwritten in place by softmax - onehot(label) in bf16.
// The label's logit is read before any thread can overwrite it: the reduction's barriers sit
// between the read and pass 2.
#include <cmath>

#include "cuda/train_common.cuh"
#include "cuda/train_kernels.h"

namespace fused {
namespace detail {
namespace {

constexpr int kThreads = 256;

// Running max and sum of exp(x - max); an empty part is (-inf, 0).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;  // also avoids exp(-inf - -inf) = NaN when both are empty
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

template <int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(bf16* __restrict__ logits,
                                                                      const int64_t* __restrict__ labels,
                                                                      int64_t ignore_index, float* __restrict__ row_loss,
                                                                      int64_t vocab, bool write_grad) {
  __shared__ float sm_m[32], sm_s[32];
  const int64_t row = blockIdx.x;
  bf16* x = logits + row * vocab;
  const int64_t label = labels[row];
  const bool valid = label != ignore_index && label >= 0 && label < vocab;
  const float label_logit = valid ? __bfloat162float(x[label]) : 0.f;

  MaxSum acc{-INFINITY, 0.f};
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += static_cast<int64_t>(kThreads) * VEC) {
    float v[VEC];
    load_bf16<VEC>(x + i, v);
    float m = acc.m;
#pragma unroll
    for (int e = 0; e < VEC; ++e) m = fmaxf(m, v[e]);
    if (m == -INFINITY) continue;  // nothing but -inf so far: the running sum stays 0
    float s = acc.s * expf(acc.m - m);  // one rescale per VEC elements; expf(-inf) = 0 at the start
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += expf(v[e] - m);
    acc = MaxSum{m, s};
  }
  acc = warp_combine(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm_m[warp] = acc.m;
    sm_s[warp] = acc.s;
  }
  __syncthreads();
  MaxSum total{-INFINITY, 0.f};
  if (lane < kThreads / 32) total = MaxSum{sm_m[lane], sm_s[lane]};
  total = warp_combine(total);
  const float lse = total.m + logf(total.s);
  if (threadIdx.x == 0) row_loss[row] = valid ? lse - label_logit : 0.f;
  if (!write_grad) return;

  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += static_cast<int64_t>(kThreads) * VEC) {
    float v[VEC];
    load_bf16<VEC>(x + i, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = valid ? expf(v[e] - lse) - (i + e == label ? 1.f : 0.f) : 0.f;
    store_bf16<VEC>(x + i, v);
  }
}

}  // namespace
}  // namespace detail

void cross_entropy_rows(void* logits, const int64_t* labels, int64_t ignore_index, float* row_loss, int64_t rows,
                        int64_t vocab, bool write_grad, cudaStream_t stream) {
  using namespace detail;
  if (vocab <= 0) throw std::runtime_error("cross_entropy_rows: vocab must be positive");
  if (rows == 0) return;
  if (rows > 0x7fffffff) throw std::runtime_error("cross_entropy_rows: too many rows for one launch");
  auto* x = static_cast<bf16*>(logits);
  const unsigned grid = static_cast<unsigned>(rows);
  if (vocab % 8 == 0 && aligned16(logits))
    cross_entropy_rows_kernel<8><<<grid, kThreads, 0, stream>>>(x, labels, ignore_index, row_loss, vocab, write_grad);
  else
    cross_entropy_rows_kernel<1><<<grid, kThreads, 0, stream>>>(x, labels, ignore_index, row_loss, vocab, write_grad);
  launch_check("cross_entropy_rows");
}

}  // namespace fused
