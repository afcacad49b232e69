// Device building blocks shared by the mma.sync kernels (FlashAttention-2 style): tensor-core MMA
// m16n8k16 with fp32 accumulation, ldmatrix, cp.async with zero fill, and the swizzled shared-memory
// tile layout. Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16").
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/ffa_plan.h"

namespace ffa {
namespace dev {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x with one MUFU.EX2 (flush-to-zero; exp2f's denormal handling costs ~3 more instructions per
// element, and P values under 2^-126 do not matter). exp2_ftz(-inf) = +0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a * b; a: 16x16 row-major (4 regs), b: 16x8 column-major (2 regs), c: 16x8 fp32.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async copy global -> shared; when !valid nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Byte offset of element (row, col) in a tile with W 2-byte elements per row. 16-byte chunks are
// XOR-swizzled with the row so that the 8 rows an ldmatrix phase reads hit 8 different bank groups.
template <int W>
__device__ __forceinline__ uint32_t tile_off(int row, int col) {
  static_assert(W % 64 == 0, "row of at least 8 chunks");
  return static_cast<uint32_t>(row * (W * 2) + ((((col >> 3) ^ (row & 7))) << 4) + ((col & 7) << 1));
}

// Loads rows [row0, row0 + ROWS) x D of a (T, stride_token) matrix into a swizzled tile; rows at or
// beyond row_limit are zero-filled (never read).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const T* base, int64_t stride_token, int row0,
                                                int row_limit, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % NTHREADS == 0, "tile divides among threads");
#pragma unroll
  for (int n = 0; n < kChunks / NTHREADS; ++n) {
    const int idx = tid + n * NTHREADS;
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const bool valid = row0 + r < row_limit;
    const T* src = valid ? base + static_cast<int64_t>(row0 + r) * stride_token + c : base;
    cp_async16(dst + tile_off<D>(r, c), src, valid);
  }
}

// Copies ROWS x D of a swizzled tile (rows [0, ROWS) relative) to global rows row0 + r, skipping rows
// at or beyond row_end. Used by one warp for its own 16 rows.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void store_tile_warp(const unsigned char* tile, int tile_row0, T* base,
                                                int64_t stride_token, int row0, int row_end, int lane) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int n = 0; n < ROWS * kChunksPerRow / 32; ++n) {
    const int idx = lane + n * 32;
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    if (row0 + r < row_end) {
      const uint4 val = *reinterpret_cast<const uint4*>(tile + tile_off<D>(tile_row0 + r, c));
      *reinterpret_cast<uint4*>(base + static_cast<int64_t>(row0 + r) * stride_token + c) = val;
    }
  }
}

__device__ __forceinline__ bool cut_visible(const CutSlice& c, int i, int j) {
  return i >= c.q_start && i < c.q_end && j >= c.k_start && j < c.k_end && j >= i + c.lo && j <= i + c.hi;
}

}  // namespace dev
}  // namespace ffa
