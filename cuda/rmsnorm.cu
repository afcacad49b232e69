// Fused RMSNorm forward and backward (cuda/train_kernels.h), alone or after a residual add (the
// Llama layer's h = x + delta; y = norm(h)). A block of 256 threads works on one row at a time; each thread owns SLOTS groups of 8 consecutive columns (column (slot * 256 + tid) * 8),
// so a row of up to 2048 * SLOTS columns sits in registers between the reduction and the output.
// The backward keeps each thread's share of dweight in registers over all the rows its block
// handles, writes them once as the block's partial sum, and a second kernel adds the partials
// column by column: no atomics, and the same order on every run.
#include "cuda/train_common.cuh"
#include "cuda/train_kernels.h"

namespace fused {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kColsPerSlot = kThreads * 8;
constexpr int64_t kMaxBlocks = 512;  // backward grid cap: bounds the dweight partials (512 x cols fp32)

// ADD: the row is h = bf16(x + delta) (torch's bf16 add: the fp32 sum rounded once), written to
// h_out, and normalised from those rounded values, so y equals the plain kernel's y of h.
template <int SLOTS, bool ADD>
__global__ void __launch_bounds__(kThreads) rmsnorm_forward_kernel(const bf16* __restrict__ x,
                                                                   const bf16* __restrict__ delta,
                                                                   const bf16* __restrict__ weight, bf16* __restrict__ h_out,
                                                                   bf16* __restrict__ y, float* __restrict__ rstd,
                                                                   int64_t rows, int cols, float eps) {
  __shared__ float smem[32];
  float w[SLOTS][8];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int c = (s * kThreads + threadIdx.x) * 8;
    if (c < cols) load_bf16<8>(weight + c, w[s]);
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* xr = x + row * cols;
    float v[SLOTS][8];
    float ss = 0.f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int c = (s * kThreads + threadIdx.x) * 8;
      if (c < cols) {
        load_bf16<8>(xr + c, v[s]);
        if constexpr (ADD) {
          float d[8];
          load_bf16<8>(delta + row * cols + c, d);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[s][i] = round_bf16(v[s][i] + d[i]);
          store_bf16<8>(h_out + row * cols + c, v[s]);  // exact: the values are bf16 already
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += v[s][i] * v[s][i];
      }
    }
    ss = block_sum(ss, smem);
    // HF: h * rsqrt(h.pow(2).mean(-1) + eps) in fp32; torch's mean multiplies the sum by 1/cols.
    const float r = rsqrtf(ss * (1.f / static_cast<float>(cols)) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int c = (s * kThreads + threadIdx.x) * 8;
      if (c < cols) {
        float o[8];
        // Cast to bf16 first, then the bf16 weight product (rounded again on store).
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = w[s][i] * round_bf16(v[s][i] * r);
        store_bf16<8>(y + row * cols + c, o);
      }
    }
  }
}

// dx = rstd * g - x * rstd^3 * mean(g * x) with g = dy * weight (the exact derivative of
// x * rstd(x), in fp32); dweight += dy * bf16(x * rstd), the value the weight multiplied.
// dres (or null): the gradient that reaches x by the residual path, added before the one rounding.
template <int SLOTS>
__global__ void __launch_bounds__(kThreads) rmsnorm_backward_kernel(const bf16* __restrict__ dy,
                                                                    const bf16* __restrict__ dres,
                                                                    const bf16* __restrict__ x,
                                                                    const bf16* __restrict__ weight,
                                                                    const float* __restrict__ rstd, bf16* __restrict__ dx,
                                                                    float* __restrict__ partial, int64_t rows, int cols) {
  __shared__ float smem[32];
  float w[SLOTS][8], dw[SLOTS][8];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int c = (s * kThreads + threadIdx.x) * 8;
    if (c < cols) load_bf16<8>(weight + c, w[s]);
#pragma unroll
    for (int i = 0; i < 8; ++i) dw[s][i] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    float xv[SLOTS][8], g[SLOTS][8];
    float dot = 0.f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int c = (s * kThreads + threadIdx.x) * 8;
      if (c < cols) {
        float d[8];
        load_bf16<8>(dy + row * cols + c, d);
        load_bf16<8>(x + row * cols + c, xv[s]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          g[s][i] = d[i] * w[s][i];
          dot += g[s][i] * xv[s][i];
          dw[s][i] += d[i] * round_bf16(xv[s][i] * r);
        }
      }
    }
    dot = block_sum(dot, smem);
    const float k = r * r * r * dot * (1.f / static_cast<float>(cols));
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int c = (s * kThreads + threadIdx.x) * 8;
      if (c < cols) {
        float o[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = r * g[s][i] - xv[s][i] * k;
        if (dres != nullptr) {
          float d[8];
          load_bf16<8>(dres + row * cols + c, d);
#pragma unroll
          for (int i = 0; i < 8; ++i) o[i] += d[i];
        }
        store_bf16<8>(dx + row * cols + c, o);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int c = (s * kThreads + threadIdx.x) * 8;
    if (c < cols) {
#pragma unroll
      for (int i = 0; i < 8; ++i) partial[blockIdx.x * static_cast<int64_t>(cols) + c + i] = dw[s][i];
    }
  }
}

// dweight[c] = sum over blocks of partial[b][c], one thread per column (coalesced across columns).
__global__ void column_sum_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t parts,
                                  int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.f;
  for (int64_t b = 0; b < parts; ++b) acc += partial[b * cols + c];
  out[c] = acc;
}

int slots_for(int64_t cols) { return static_cast<int>((cols + kColsPerSlot - 1) / kColsPerSlot); }

int64_t backward_blocks(int64_t rows) { return rows < kMaxBlocks ? rows : kMaxBlocks; }

}  // namespace
}  // namespace detail

bool rmsnorm_supported(int64_t cols) { return cols > 0 && cols % 8 == 0 && cols <= kRmsNormMaxCols; }

namespace detail {
namespace {

template <bool ADD>
void forward_launch(const void* x, const void* delta, const void* weight, void* h, void* y, float* rstd, int64_t rows,
                    int64_t cols, float eps, cudaStream_t stream, const char* what) {
  if (!rmsnorm_supported(cols)) throw std::runtime_error(std::string(what) + ": unsupported row length");
  for (const void* p : {x, weight, static_cast<const void*>(y)}) require_aligned(what, p);
  if (ADD)
    for (const void* p : {delta, static_cast<const void*>(h)}) require_aligned(what, p);
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows < 65536 ? rows : 65536);
  const auto* xb = static_cast<const bf16*>(x);
  const auto* db = static_cast<const bf16*>(delta);
  const auto* wb = static_cast<const bf16*>(weight);
  auto* hb = static_cast<bf16*>(h);
  auto* yb = static_cast<bf16*>(y);
  const int c = static_cast<int>(cols);
  switch (slots_for(cols)) {
    case 1: rmsnorm_forward_kernel<1, ADD><<<grid, kThreads, 0, stream>>>(xb, db, wb, hb, yb, rstd, rows, c, eps); break;
    case 2: rmsnorm_forward_kernel<2, ADD><<<grid, kThreads, 0, stream>>>(xb, db, wb, hb, yb, rstd, rows, c, eps); break;
    case 3:
    case 4: rmsnorm_forward_kernel<4, ADD><<<grid, kThreads, 0, stream>>>(xb, db, wb, hb, yb, rstd, rows, c, eps); break;
    default: throw std::runtime_error(std::string(what) + ": row too long");
  }
  launch_check(what);
}

}  // namespace
}  // namespace detail

void rmsnorm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols, float eps,
                     cudaStream_t stream) {
  detail::forward_launch<false>(x, nullptr, weight, nullptr, y, rstd, rows, cols, eps, stream, "rmsnorm_forward");
}

void add_rmsnorm_forward(const void* x, const void* delta, const void* weight, void* h, void* y, float* rstd,
                         int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  detail::forward_launch<true>(x, delta, weight, h, y, rstd, rows, cols, eps, stream, "add_rmsnorm_forward");
}

int64_t rmsnorm_backward_workspace_floats(int64_t rows, int64_t cols) {
  return detail::backward_blocks(rows) * cols;
}

void rmsnorm_backward(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, float* dweight,
                      float* workspace, int64_t rows, int64_t cols, cudaStream_t stream) {
  add_rmsnorm_backward(dy, nullptr, x, weight, rstd, dx, dweight, workspace, rows, cols, stream);
}

void add_rmsnorm_backward(const void* dy, const void* dres, const void* x, const void* weight, const float* rstd,
                          void* dx, float* dweight, float* workspace, int64_t rows, int64_t cols, cudaStream_t stream) {
  using namespace detail;
  if (!rmsnorm_supported(cols)) throw std::runtime_error("rmsnorm_backward: unsupported row length");
  for (const void* p : {dy, x, weight, static_cast<const void*>(dx)}) require_aligned("rmsnorm_backward", p);
  if (dres != nullptr) require_aligned("rmsnorm_backward", dres);
  const int c = static_cast<int>(cols);
  if (rows == 0) {
    cudaMemsetAsync(dweight, 0, static_cast<size_t>(cols) * sizeof(float), stream);
    launch_check("rmsnorm_backward");
    return;
  }
  const int64_t blocks = backward_blocks(rows);
  const unsigned grid = static_cast<unsigned>(blocks);
  const auto* dyb = static_cast<const bf16*>(dy);
  const auto* drb = static_cast<const bf16*>(dres);
  const auto* xb = static_cast<const bf16*>(x);
  const auto* wb = static_cast<const bf16*>(weight);
  auto* dxb = static_cast<bf16*>(dx);
  switch (slots_for(cols)) {
    case 1: rmsnorm_backward_kernel<1><<<grid, kThreads, 0, stream>>>(dyb, drb, xb, wb, rstd, dxb, workspace, rows, c); break;
    case 2: rmsnorm_backward_kernel<2><<<grid, kThreads, 0, stream>>>(dyb, drb, xb, wb, rstd, dxb, workspace, rows, c); break;
    case 3:
    case 4: rmsnorm_backward_kernel<4><<<grid, kThreads, 0, stream>>>(dyb, drb, xb, wb, rstd, dxb, workspace, rows, c); break;
    default: throw std::runtime_error("rmsnorm_backward: row too long");
  }
  launch_check("rmsnorm_backward");
  column_sum_kernel<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(workspace, dweight, blocks, c);
  launch_check("rmsnorm_backward (dweight)");
}

}  // namespace fused
