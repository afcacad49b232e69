#include "core/attention_blocks.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "core/attention_backend.h"
#include "core/errors.h"

namespace flexcp {

std::vector<AttentionBlock> attention_blocks(const AttentionSpec& spec) {
  std::vector<size_t> order;
  for (size_t n = 0; n < spec.slices.size(); ++n)
    if (!spec.slices[n].q.empty() && !spec.slices[n].k.empty()) order.push_back(n);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return spec.slices[a].q.start < spec.slices[b].q.start; });
  std::vector<AttentionBlock> blocks;
  for (size_t n : order) {
    const auto& s = spec.slices[n];
    if (blocks.empty() || s.q.start >= blocks.back().q.end) {
      blocks.push_back({s.q, s.k, {n}});
      continue;
    }
    auto& b = blocks.back();
    b.q.end = std::max(b.q.end, s.q.end);
    b.k.start = std::min(b.k.start, s.k.start);
    b.k.end = std::max(b.k.end, s.k.end);
    b.slices.push_back(n);
  }
  return blocks;
}

at::Tensor block_dense_mask(const AttentionSpec& spec, const AttentionBlock& blk, const at::Device& device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  auto mask = at::zeros({blk.q.size(), blk.k.size()}, opts.dtype(at::kBool));
  for (size_t n : blk.slices) {
    const auto& s = spec.slices[n];
    const int64_t lq = s.q.size(), lk = s.k.size(), d = lk - lq;
    auto a = at::arange(lq, opts).unsqueeze(1);  // query offset inside the slice
    auto b = at::arange(lk, opts).unsqueeze(0);  // key offset inside the slice
    at::Tensor m;
    switch (s.mask) {
      case MaskType::Full: m = at::ones({lq, lk}, opts.dtype(at::kBool)); break;
      case MaskType::Causal: m = b <= a + d; break;
      case MaskType::InvCausal: m = b >= a; break;
      case MaskType::BiCausal: m = (b >= a).logical_and(b <= a + d); break;
    }
    auto region = mask.narrow(0, s.q.start - blk.q.start, lq).narrow(1, s.k.start - blk.k.start, lk);
    region.logical_or_(m);
  }
  return mask;
}

at::Tensor spec_dense_mask(const AttentionSpec& spec, const at::Device& device) {
  auto mask = at::zeros({spec.num_q, spec.num_k}, at::TensorOptions().dtype(at::kBool).device(device));
  for (const auto& blk : attention_blocks(spec))
    mask.narrow(0, blk.q.start, blk.q.size()).narrow(1, blk.k.start, blk.k.size()).copy_(block_dense_mask(spec, blk, device));
  return mask;
}

void check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec) {
  auto shape = [](const at::Tensor& t) {
    std::string s = "(";
    for (int64_t i = 0; i < t.dim(); ++i) s += (i ? "," : "") + std::to_string(t.size(i));
    return s + ")";
  };
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)
    fail("attention", "q, k, v must be (tokens, heads, head_dim); got q" + shape(q) + " k" + shape(k) + " v" + shape(v));
  if (!k.sizes().equals(v.sizes()) || q.size(2) != k.size(2))
    fail("attention", "k and v must have the same shape and q the same head_dim; got q" + shape(q) + " k" + shape(k) + " v" + shape(v));
  if (k.size(1) == 0 || q.size(1) % k.size(1) != 0)
    fail("attention", "query heads (" + std::to_string(q.size(1)) + ") must be a multiple of kv heads (" +
                          std::to_string(k.size(1)) + ")");
  if (q.size(0) != spec.num_q || k.size(0) != spec.num_k)
    fail("attention", "spec is for " + std::to_string(spec.num_q) + " queries x " + std::to_string(spec.num_k) +
                          " keys but q has " + std::to_string(q.size(0)) + " and k " + std::to_string(k.size(0)) + " tokens");
}

}  // namespace flexcp
