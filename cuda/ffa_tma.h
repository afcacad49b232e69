// Host helper shared by the TMA kernels: a tensor map over a (tokens, heads, D) tensor.
#pragma once
#include <cuda.h>

#include <cstdint>

namespace ffa {
namespace detail {

// Boxes of `rows` tokens x 1 head x 64 columns with 128-byte swizzle (the layout dev::sw_off<rows>
// describes, one box per 64-column block), zero fill past the last token. dtype: 0 bf16, 1 fp16.
CUtensorMap make_tensor_map(const void* base, int dtype, int64_t tokens, int heads, int64_t stride_token,
                            int64_t stride_head, int head_dim, int rows);

}  // namespace detail
}  // namespace ffa
