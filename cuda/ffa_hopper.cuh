// Hopper (sm_90a) helpers shared by the wgmma kernels: the 128B-swizzled tile layout, shared-memory
// matrix descriptors, wgmma fences and waits, mbarriers, TMA and named barriers (inline PTX).
#pragma once
#include <cstdint>

#include "cuda/ffa_device.cuh"

namespace ffa {
namespace dev {

// Byte offset of (row, col) in a tile of R rows stored as D/64 column blocks of R x 128 bytes, each
// 8-row group a 1024-byte 128B-swizzle atom (the canonical wgmma layout: chunk ^= row % 8).
template <int R>
__device__ __forceinline__ uint32_t sw_off(int row, int col) {
  return static_cast<uint32_t>((col >> 6) * (R * 128) + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) +
                               ((col & 7) << 1));
}

// load_rows_async (cp.async, rows at or beyond row_limit zero-filled) into an R-row sw_off<R> tile, for the
// kernels that load wgmma operands without TMA.
template <int R, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_sw_tile_async(uint32_t dst, const T* base, int64_t stride_token, int row0,
                                                   int row_limit, int tid) {
  load_rows_async<R, D, NTHREADS>(dst, [](int r, int c) { return sw_off<R>(r, c); }, base, stride_token, row0,
                                  row_limit, tid);
}

// An m64nN wgmma accumulator (fp32, N / 2 per thread) as the A operand (T pairs) of the N / 16 k-steps of
// an RS-wgmma: the C layout of two n8 fragments is the A layout of one k16 step, so k-step kk takes
// accumulator elements [8 kk, 8 kk + 8) in order.
template <typename T, int K>
__device__ __forceinline__ void acc_to_a_frags(uint32_t (&a)[K][4], const float (&acc)[8 * K]) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[kk][i] = pack2<T>(acc[8 * kk + 2 * i], acc[8 * kk + 2 * i + 1]);
}
// Two accumulators (the backward's P^T and dS^T), packed register by register in turn.
template <typename T, int K>
__device__ __forceinline__ void acc_to_a_frags(uint32_t (&a)[K][4], const float (&acc)[8 * K], uint32_t (&b)[K][4],
                                               const float (&bcc)[8 * K]) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[kk][i] = pack2<T>(acc[8 * kk + 2 * i], acc[8 * kk + 2 * i + 1]);
      b[kk][i] = pack2<T>(bcc[8 * kk + 2 * i], bcc[8 * kk + 2 * i + 1]);
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle. Offsets in bytes.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (static_cast<uint64_t>(1) << 62);
}

// v, hidden from the compiler's loop-invariant code motion: descriptors derived from it inside a loop are
// computed there, instead of being hoisted out and held in registers across the whole loop.
__device__ __forceinline__ uint32_t opaque_u32(uint32_t v) {
  asm volatile("mov.b32 %0, %0;\n" : "+r"(v));
  return v;
}

// The descriptor of (the address of d) + off, for a 16-byte multiple off that keeps the address below
// 256 KB: the address field is the descriptor's low 14 bits, so off adds to its low word alone (one add).
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t off) {
  return (d & ~0xFFFFFFFFull) | static_cast<uint32_t>(static_cast<uint32_t>(d) + (off >> 4));
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from touching accumulator registers across the asynchronous MMA boundary.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void reg_fence_u(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Four 8x8 b16 matrices from registers to shared memory: lane i gives the address of row i % 8 of
// matrix i / 8; register m holds, in lane t, elements (t / 4, 2 (t % 4) .. +1) of matrix m (the mma
// accumulator fragment layout).
__device__ __forceinline__ void stsm_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// 3-D tensor copy global -> shared (box of the tensor map at coordinates x, y, z), completing on bar.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, int x, int y, int z, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(x), "r"(y), "r"(z), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Bulk asynchronous reduction global[dst, dst + bytes) += shared[src, src + bytes) in fp32, through the
// TMA unit (one L2 transaction stream instead of per-element atomics). Tracked by this thread's bulk
// async-groups: commit, then wait (.read: the shared source may be reused) before touching src again.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                   static_cast<uint64_t>(__cvta_generic_to_global(dst))),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

}  // namespace dev
}  // namespace ffa
