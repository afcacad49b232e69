// The epilogues of the wgmma kernels: each warp holds the accumulators of 16 rows (m64 wgmma fragments)
// and writes them out through a tile in shared memory that is free by then (the caller's barrier), so
// that global stores are whole 16-byte row chunks. Forward (ffa_fwd_wgmma.cu, ffa_fwd_tma.cu,
// ffa_fwd_overlap.cu): out and lse through the Q tile; backward (ffa_bwd_wgmma.cu,
// ffa_bwd_dqwriter.cu): dK and dV through the K and V tiles.
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_hopper.cuh"

namespace ffa {
namespace dev {

// The sum of x over the quad of lanes that share an accumulator row (each holds its own columns' part).
__device__ __forceinline__ float quad_row_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// Forward: the lse (natural log) of a row from its max m (log2 domain) and its full sum; -inf for a row
// that saw no key (sum 0).
__device__ __forceinline__ float row_lse(float m, float sum) {
  return sum > 0.f ? (m + __log2f(sum)) * kLn2 : -INFINITY;
}

// The warp's 16 rows [row0, row0 + 16) of an R-row swizzled tile to global rows base_row + row (row
// stride st) below row_end, in 16-byte chunks (consecutive lanes, consecutive chunks of a row).
template <typename T, int D, int R>
__device__ __forceinline__ void copy_tile_rows(const unsigned char* tile, int row0, T* dst, int64_t st, int base_row,
                                               int row_end) {
  const int lane = threadIdx.x & 31;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int k = 0; k < 16 * kChunksPerRow / 32; ++k) {
    const int idx = lane + k * 32;
    const int r = row0 + idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const int grow = base_row + r;
    if (grow < row_end)
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(grow) * st + c) =
          *reinterpret_cast<const uint4*>(tile + sw_off<R>(r, c));
  }
}

// Forward: rows [row0, row0 + 16) of the R-row swizzled Q tile at q_tile receive out = o / l (the row
// sums l are per thread, reduced over its quad here, unless kFullSums: then each lane holds its rows'
// whole sums already; m is what each row subtracted before its exponentials, log2 domain: its running
// max, or in forward kernels 3/5 0 or a reference, see ZeroWindow and LazyRef in ffa_fwd_overlap.cu);
// then to global rows row_begin + row below row_end of og (the head's first row), and lse (natural log,
// -inf for a row that saw no key) to lse_h[row * lse_st].
template <typename T, int D, int R, bool kFullSums = false>
__device__ __forceinline__ void store_out_lse_warp_rows(unsigned char* q_tile, int row0, const float (&o)[D / 2],
                                                        const float (&l)[2], const float (&m)[2], T* og, int64_t o_st,
                                                        float* lse_h, int64_t lse_st, int row_begin, int row_end) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = kFullSums ? l[r] : quad_row_sum(l[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int row = row0 + (lane >> 2) + r * 8;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(q_tile + sw_off<R>(row, col)) =
          pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
    }
    const int grow = row_begin + row;
    if ((lane & 3) == 0 && grow < row_end) lse_h[grow * lse_st] = row_lse(m[r], sum);
  }
  __syncwarp();
  copy_tile_rows<T, D, R>(q_tile, row0, og, o_st, row_begin, row_end);
}

// Backward: rows [row0, row0 + 16) of the R-row swizzled tiles at k_tile / v_tile: dK times `scale` and dV, in T,
// then to global rows c0 + row for the rows below row_end (dkg / dvg: the kv head's first row).
template <typename T, int D, int R>
__device__ __forceinline__ void store_dkdv_warp_rows(unsigned char* k_tile, unsigned char* v_tile, int row0,
                                                     const float (&dk)[D / 2], const float (&dv)[D / 2],
                                                     float scale, T* dkg, int64_t dk_st, T* dvg, int64_t dv_st,
                                                     int c0, int row_end) {
  const int lane = threadIdx.x & 31;
  const int row = row0 + (lane >> 2);
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = j * 8 + (lane & 3) * 2;
    *reinterpret_cast<uint32_t*>(k_tile + sw_off<R>(row, col)) = pack2<T>(dk[4 * j] * scale, dk[4 * j + 1] * scale);
    *reinterpret_cast<uint32_t*>(k_tile + sw_off<R>(row + 8, col)) =
        pack2<T>(dk[4 * j + 2] * scale, dk[4 * j + 3] * scale);
    *reinterpret_cast<uint32_t*>(v_tile + sw_off<R>(row, col)) = pack2<T>(dv[4 * j], dv[4 * j + 1]);
    *reinterpret_cast<uint32_t*>(v_tile + sw_off<R>(row + 8, col)) = pack2<T>(dv[4 * j + 2], dv[4 * j + 3]);
  }
  __syncwarp();
  copy_tile_rows<T, D, R>(k_tile, row0, dkg, dk_st, c0, row_end);
  copy_tile_rows<T, D, R>(v_tile, row0, dvg, dv_st, c0, row_end);
}

}  // namespace dev
}  // namespace ffa
