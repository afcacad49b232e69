// Fused rotary embeddings for q and k in one launch (cuda/train_kernels.h). One thread rotates 8
// pairs (j, j + D/2) of one head of one token; the q heads come first, then the k heads.
//   forward:  o[j] = x[j] c[j] - x[j+h] s[j];   o[j+h] = x[j+h] c[j+h] + x[j] s[j+h]
//   inverse:  o[j] = x[j] c[j] + x[j+h] s[j+h]; o[j+h] = x[j+h] c[j+h] - x[j] s[j]
// The inverse is the transpose of the forward map, so it gives the backward (dx from dout) for any
// cos/sin tables, duplicated halves (HF's layout) or not.
#include "cuda/train_common.cuh"
#include "cuda/train_kernels.h"

namespace fused {
namespace detail {
namespace {

__device__ __forceinline__ void load_f32x8_as_bf16(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = round_bf16(f[i]);  // HF casts cos/sin to the activations' dtype
}

template <bool Inverse>
__global__ void rope_kernel(const bf16* __restrict__ q_in, const bf16* __restrict__ k_in, bf16* __restrict__ q_out,
                            bf16* __restrict__ k_out, const float* __restrict__ cos, const float* __restrict__ sin,
                            int64_t tokens, int heads_q, int heads_k, int head_dim) {
  const int half = head_dim / 2, groups = half / 8, heads = heads_q + heads_k;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * heads * groups) return;
  const int g = static_cast<int>(idx % groups);
  const int head = static_cast<int>((idx / groups) % heads);
  const int64_t t = idx / (static_cast<int64_t>(groups) * heads);
  const bool is_q = head < heads_q;
  const int64_t off = is_q ? (t * heads_q + head) * head_dim : (t * heads_k + (head - heads_q)) * head_dim;
  const bf16* in = (is_q ? q_in : k_in) + off;
  bf16* out = (is_q ? q_out : k_out) + off;
  const int j = g * 8;
  float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8];
  load_bf16<8>(in + j, x1);
  load_bf16<8>(in + half + j, x2);
  load_f32x8_as_bf16(cos + t * head_dim + j, c1);
  load_f32x8_as_bf16(cos + t * head_dim + half + j, c2);
  load_f32x8_as_bf16(sin + t * head_dim + j, s1);
  load_f32x8_as_bf16(sin + t * head_dim + half + j, s2);
  float o1[8], o2[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (Inverse) {
      o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
      o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
    } else {
      o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
      o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
  }
  store_bf16<8>(out + j, o1);
  store_bf16<8>(out + half + j, o2);
}

}  // namespace
}  // namespace detail

bool rope_supported(int64_t head_dim) { return head_dim > 0 && head_dim % 16 == 0; }

void rope_apply(const void* q_in, const void* k_in, void* q_out, void* k_out, const float* cos, const float* sin,
                int64_t tokens, int64_t heads_q, int64_t heads_k, int64_t head_dim, bool inverse, cudaStream_t stream) {
  using namespace detail;
  if (!rope_supported(head_dim)) throw std::runtime_error("rope_apply: head_dim must be a multiple of 16");
  for (const void* p : {q_in, k_in, static_cast<const void*>(q_out), static_cast<const void*>(k_out),
                        static_cast<const void*>(cos), static_cast<const void*>(sin)})
    require_aligned("rope_apply", p);
  const int64_t threads = tokens * (heads_q + heads_k) * (head_dim / 16);
  if (threads == 0) return;
  const int block = 256;
  const unsigned grid = static_cast<unsigned>((threads + block - 1) / block);
  const auto* qi = static_cast<const bf16*>(q_in);
  const auto* ki = static_cast<const bf16*>(k_in);
  auto* qo = static_cast<bf16*>(q_out);
  auto* ko = static_cast<bf16*>(k_out);
  const int hq = static_cast<int>(heads_q), hk = static_cast<int>(heads_k), d = static_cast<int>(head_dim);
  if (inverse)
    rope_kernel<true><<<grid, block, 0, stream>>>(qi, ki, qo, ko, cos, sin, tokens, hq, hk, d);
  else
    rope_kernel<false><<<grid, block, 0, stream>>>(qi, ki, qo, ko, cos, sin, tokens, hq, hk, d);
  launch_check("rope_apply");
}

}  // namespace fused
