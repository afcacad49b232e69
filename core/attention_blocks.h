// Splitting a spec into independent blocks (groups of slices whose q ranges chain together), and
// dense masks over a block. Dense paths (the reference kernel, the torch fallback) work block by
// block so a flattened batch of B samples costs B small squares, not one big one.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "core/attention_spec.h"

namespace flexcp {

struct AttentionBlock {
  Range q;                     // union of the q ranges of its slices
  Range k;                     // bounding range of their k ranges
  std::vector<size_t> slices;  // indices into spec.slices
};

// Blocks with pairwise disjoint q ranges, in ascending q order. Empty slices are dropped.
std::vector<AttentionBlock> attention_blocks(const AttentionSpec& spec);

// Visibility mask (blk.q.size(), blk.k.size()) of one block, bool, on `device`.
at::Tensor block_dense_mask(const AttentionSpec& spec, const AttentionBlock& blk, const at::Device& device);

// Throws UserError unless q (Tq,Hq,D), k and v (Tk,Hkv,D) agree with each other and with the spec.
void check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec);

}  // namespace flexcp
