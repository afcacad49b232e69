// The dK/dV epilogue of the wgmma backward kernels (ffa_bwd_wgmma.cu, ffa_bwd_tma.cu,
// ffa_bwd_pingpong.cu): each warp holds the accumulators of 16 key rows (m64 wgmma fragments) and
// writes them out through the K and V tiles in shared memory, which are free once the last GEMM that
// reads them is done (the caller's barrier), so that global stores are whole 16-byte row chunks.
#pragma once
#include <cstdint>

#include "cuda/ffa_device.cuh"
#include "cuda/ffa_hopper.cuh"

namespace ffa {
namespace dev {

// Rows [row0, row0 + 16) of the R-row swizzled tiles at k_tile / v_tile: dK times `scale` and dV, in T,
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
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int k = 0; k < 16 * kChunksPerRow / 32; ++k) {
    const int idx = lane + k * 32;
    const int r = row0 + idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const int grow = c0 + r;
    if (grow < row_end) {
      *reinterpret_cast<uint4*>(dkg + static_cast<int64_t>(grow) * dk_st + c) =
          *reinterpret_cast<const uint4*>(k_tile + sw_off<R>(r, c));
      *reinterpret_cast<uint4*>(dvg + static_cast<int64_t>(grow) * dv_st + c) =
          *reinterpret_cast<const uint4*>(v_tile + sw_off<R>(r, c));
    }
  }
}

}  // namespace dev
}  // namespace ffa
