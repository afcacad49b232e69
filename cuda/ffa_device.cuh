// Device building blocks shared by the mma.sync kernels (FlashAttention-2 style): tensor-core MMA
// m16n8k16 with fp32 accumulation, ldmatrix, cp.async with zero fill, and the swizzled shared-memory
// tile layout. Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16").
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/ffa_kernels.h"
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

// 2^x by exp2_ftz (kFtz) or by exp2f (denormal results kept): kernels that share code differ in this choice.
template <bool kFtz>
__device__ __forceinline__ float exp2_maybe_ftz(float x) {
  if constexpr (kFtz)
    return exp2_ftz(x);
  else
    return exp2f(x);
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

// Loads rows [row0, row0 + ROWS) x D of a (T, stride_token) matrix into a tile at dst whose byte offset
// of (row, col) is off(row, col) (the tile's swizzled layout); rows at or beyond row_limit are
// zero-filled (never read). NTHREADS threads (this one: tid) share the 16-byte chunks.
template <int ROWS, int D, int NTHREADS, typename T, typename Off>
__device__ __forceinline__ void load_rows_async(uint32_t dst, Off off, const T* base, int64_t stride_token, int row0,
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
    cp_async16(dst + off(r, c), src, valid);
  }
}

// load_rows_async into a tile_off<D> tile (the mma.sync kernels' layout).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const T* base, int64_t stride_token, int row0,
                                                int row_limit, int tid) {
  load_rows_async<ROWS, D, NTHREADS>(dst, [](int r, int c) { return tile_off<D>(r, c); }, base, stride_token, row0,
                                     row_limit, tid);
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

// Element e of m16n8 accumulator fragment j, in either form the kernels keep a warp's 16 x N fp32
// accumulator in: float[N / 8][4] (mma.sync) or float[N / 2] (an m64nN wgmma, the same fragments in
// order). The thread holds rows (lane / 4) + 8 (e / 2), columns 8 j + 2 (lane % 4) + e % 2.
template <int J>
__device__ __forceinline__ float& acc_at(float (&acc)[J][4], int j, int e) {
  return acc[j][e];
}
template <int N>
__device__ __forceinline__ float& acc_at(float (&acc)[N], int j, int e) {
  return acc[4 * j + e];
}

// The work tile of a CTA of a q-side kernel (forward, deterministic dQ): plan item tile / heads_q of
// query head tile % heads_q, whose kv head is h / group (GQA). Tile: blockIdx.x (unsigned division) or
// a persistent kernel's tile number (int).
struct QWorkTile {
  Item it;
  int h, hk;
};
template <typename Tile>
__device__ __forceinline__ QWorkTile q_work_tile(const detail::SideView& side, int heads_q, int group, Tile tile) {
  const int item_idx = tile / heads_q;
  const int h = tile % heads_q;
  const int hk = h / group;
  return {side.items[item_idx], h, hk};
}

// Forward: sets the scores of a 16-row x COLS-key tile (accumulator s, acc_at layout) that cut hides to
// -inf. row_lo: the thread's first row (its second is row_lo + 8); c0: the tile's first key. cut is taken
// by value: its fields are read once up front, not behind the per-element tests.
template <int COLS, typename Acc>
__device__ __forceinline__ void mask_scores(Acc& s, const CutSlice cut, int row_lo, int c0, int lane) {
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row_lo + (e >> 1) * 8, col = c0 + j * 8 + (lane & 3) * 2 + (e & 1);
      if (!cut_visible(cut, i, col)) acc_at(s, j, e) = -INFINITY;
    }
}

// Forward online softmax of row r (0: the thread's first row, 1: its second) of a 16-row x COLS-key score
// tile in the wgmma accumulator layout (acc_at): the row max over the quad of lanes that share the row
// moves m[r] (log2 domain; a row that has seen no key keeps -inf and gets P = 0, never NaN), s becomes the
// unnormalized P, l[r] (the thread's partial row sum) is rescaled and grows by its P; alpha receives the
// factor by which the row of O must be scaled. kFtz: 2^x by exp2_ftz (one MUFU) instead of exp2f.
// scale_log2 is taken by reference (the kernels pass p.scale_log2): read where it is used, as the kernels
// did before this helper, which keeps their generated code unchanged.
template <int COLS, bool kFtz>
__device__ __forceinline__ void online_softmax_row(float (&s)[COLS / 2], int r, float (&m)[2], float (&l)[2],
                                                   float& alpha, const float& scale_log2) {
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m[r], mx * scale_log2);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  alpha = exp2_maybe_ftz<kFtz>(m[r] - m_use);
  m[r] = m_new;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j) {
    const float p0 = exp2_maybe_ftz<kFtz>(fmaf(s[4 * j + 2 * r], scale_log2, -m_use));
    const float p1 = exp2_maybe_ftz<kFtz>(fmaf(s[4 * j + 2 * r + 1], scale_log2, -m_use));
    s[4 * j + 2 * r] = p0;
    s[4 * j + 2 * r + 1] = p1;
    sum += p0 + p1;
  }
  l[r] = l[r] * alpha + sum;
}

// Backward dK/dV kernels (ffa_bwd.cu dkdv_kernel, ffa_bwd_wgmma.cu): a CTA walks, for its k-side item,
// the query heads g of its kv head's GQA group, and per head the item's runs and their q tiles t.
struct GroupRunCursor {
  int g, run, t;
};
__device__ __forceinline__ GroupRunCursor group_run_next(const Run* runs, const Item& it, GroupRunCursor c) {
  if (c.t + 1 < runs[c.run].tiles) return {c.g, c.run, c.t + 1};
  if (c.run + 1 < it.run_end) return {c.g, c.run + 1, 0};
  return {c.g + 1, it.run_begin, 0};
}

// Backward dK/dV: threads tid < ROWS stage the stats of query rows q0 + tid of head h: lse * log2(e)
// (+inf for a row that saw no key and for rows past num_q, so that P = 0 there, never NaN) and delta.
template <int ROWS>
__device__ __forceinline__ void load_bwd_row_stats(const detail::BwdParams& p, int h, int q0, float* lse2_dst,
                                                   float* delta_dst, int tid) {
  if (tid < ROWS) {
    const int row = q0 + tid;
    float lse2 = INFINITY, dl = 0.f;
    if (row < p.num_q) {
      const float lse = p.lse[row * p.lse_st + h * p.lse_sh];
      lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;  // empty rows: P = 0, never NaN
      dl = p.delta[static_cast<int64_t>(row) * p.heads_q + h];
    }
    lse2_dst[tid] = lse2;
    delta_dst[tid] = dl;
  }
}

// Backward dK/dV: the transposed tile of a step (the warp's 16 keys x COLS queries, acc_at layout) from
// S^T to P^T = 2^(S^T scale_log2 - lse2) (0 where the cut hides (query, key)) in s, and from dP^T to
// dS^T = P^T (dP^T - delta) in dp. lse2, delta: the step's query stats (load_bwd_row_stats); q0: its first
// query; key_lo: the thread's first key (its second is key_lo + 8).
template <int COLS, typename Acc>
__device__ __forceinline__ void bwd_p_ds_transposed(Acc& s, Acc& dp, float scale_log2, const float* lse2,
                                                    const float* delta, bool masked, const CutSlice& cut, int q0,
                                                    int key_lo, int lane) {
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + (lane & 3) * 2 + (e & 1);
      float pr = exp2f(fmaf(acc_at(s, j, e), scale_log2, -lse2[col]));
      if (masked && !cut_visible(cut, q0 + col, key_lo + (e >> 1) * 8)) pr = 0.f;
      acc_at(s, j, e) = pr;
      acc_at(dp, j, e) = pr * (acc_at(dp, j, e) - delta[col]);
    }
}

}  // namespace dev
}  // namespace ffa
