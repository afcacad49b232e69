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

// Rotates the 8 pairs (j + i, j + i + half) of one head row `in` of token t into `out`.
template <bool Inverse>
__device__ __forceinline__ void rotate_pairs(const bf16* in, bf16* out, const float* __restrict__ cos,
                                             const float* __restrict__ sin, int64_t t, int head_dim, int j) {
  const int half = head_dim / 2;
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
  rotate_pairs<Inverse>(in, out, cos, sin, t, head_dim, g * 8);
}

// One of q, k, v in rope_qkv: rows of heads * head_dim elements at a row stride (elements).
struct QkvPart {
  const bf16* in;
  int64_t in_stride;
  bf16* out;
  int64_t out_stride;
};

// As rope_kernel, over the heads of q, then k, then v (v is copied, not rotated).
template <bool Inverse>
__global__ void rope_qkv_kernel(QkvPart q, QkvPart k, QkvPart v, const float* __restrict__ cos,
                                const float* __restrict__ sin, int64_t tokens, int heads_q, int heads_kv, int head_dim) {
  const int half = head_dim / 2, groups = half / 8, heads = heads_q + 2 * heads_kv;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * heads * groups) return;
  const int g = static_cast<int>(idx % groups);
  int head = static_cast<int>((idx / groups) % heads);
  const int64_t t = idx / (static_cast<int64_t>(groups) * heads);
  const int which = head < heads_q ? 0 : head < heads_q + heads_kv ? 1 : 2;
  head -= which == 0 ? 0 : which == 1 ? heads_q : heads_q + heads_kv;
  const QkvPart& part = which == 0 ? q : which == 1 ? k : v;
  const bf16* in = part.in + t * part.in_stride + static_cast<int64_t>(head) * head_dim;
  bf16* out = part.out + t * part.out_stride + static_cast<int64_t>(head) * head_dim;
  const int j = g * 8;
  if (which == 2) {  // v: bf16 values in, the same out
    float x1[8], x2[8];
    load_bf16<8>(in + j, x1);
    load_bf16<8>(in + half + j, x2);
    store_bf16<8>(out + j, x1);
    store_bf16<8>(out + half + j, x2);
    return;
  }
  rotate_pairs<Inverse>(in, out, cos, sin, t, head_dim, j);
}

template <bool Inverse>
void rope_qkv_launch(QkvPart q, QkvPart k, QkvPart v, const float* cos, const float* sin, int64_t tokens,
                     int64_t heads_q, int64_t heads_kv, int64_t head_dim, cudaStream_t stream, const char* what) {
  if (!rope_supported(head_dim)) throw std::runtime_error(std::string(what) + ": head_dim must be a multiple of 16");
  for (const QkvPart& p : {q, k, v}) {
    require_aligned(what, p.in);
    require_aligned(what, p.out);
    if (p.in_stride % 8 != 0 || p.out_stride % 8 != 0)
      throw std::runtime_error(std::string(what) + ": row strides must be multiples of 8 elements");
  }
  require_aligned(what, cos);
  require_aligned(what, sin);
  const int64_t threads = tokens * (heads_q + 2 * heads_kv) * (head_dim / 16);
  if (threads == 0) return;
  const int block = 256;
  const unsigned grid = static_cast<unsigned>((threads + block - 1) / block);
  rope_qkv_kernel<Inverse><<<grid, block, 0, stream>>>(q, k, v, cos, sin, tokens, static_cast<int>(heads_q),
                                                       static_cast<int>(heads_kv), static_cast<int>(head_dim));
  launch_check(what);
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

void rope_qkv_forward(const void* qkv, void* q, void* k, void* v, const float* cos, const float* sin, int64_t tokens,
                      int64_t heads_q, int64_t heads_kv, int64_t head_dim, cudaStream_t stream) {
  using namespace detail;
  const auto* in = static_cast<const bf16*>(qkv);
  const int64_t row = (heads_q + 2 * heads_kv) * head_dim, nq = heads_q * head_dim, nkv = heads_kv * head_dim;
  rope_qkv_launch<false>({in, row, static_cast<bf16*>(q), nq}, {in + nq, row, static_cast<bf16*>(k), nkv},
                         {in + nq + nkv, row, static_cast<bf16*>(v), nkv}, cos, sin, tokens, heads_q, heads_kv, head_dim,
                         stream, "rope_qkv_forward");
}

void rope_qkv_backward(const void* dq, const void* dk, const void* dv, void* dqkv, const float* cos, const float* sin,
                       int64_t tokens, int64_t heads_q, int64_t heads_kv, int64_t head_dim, cudaStream_t stream) {
  using namespace detail;
  auto* out = static_cast<bf16*>(dqkv);
  const int64_t row = (heads_q + 2 * heads_kv) * head_dim, nq = heads_q * head_dim, nkv = heads_kv * head_dim;
  rope_qkv_launch<true>({static_cast<const bf16*>(dq), nq, out, row}, {static_cast<const bf16*>(dk), nkv, out + nq, row},
                        {static_cast<const bf16*>(dv), nkv, out + nq + nkv, row}, cos, sin, tokens, heads_q, heads_kv,
                        head_dim, stream, "rope_qkv_backward");
}

}  // namespace fused
