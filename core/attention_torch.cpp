// The `torch` backend: PyTorch's own attention, differentiated by autograd. A flattened batch of
// equal causal samples goes to scaled_dot_product_attention (LibTorch 2.x: cuDNN / FlashAttention on
// GPU); any other spec, and every spec on LibTorch 1.x, runs as masked fp32 math block by block.
#include <ATen/ATen.h>
#include <torch/version.h>

#include "core/attention_backend.h"
#include "core/attention_blocks.h"

namespace flexcp {
namespace {

// Number of samples when the spec is B equal causal samples laid end to end, else 0. Only the
// SDPA path of LibTorch 2.x uses it.
[[maybe_unused]] int64_t uniform_causal_samples(const AttentionSpec& spec) {
  const int64_t b = static_cast<int64_t>(spec.slices.size());
  if (b == 0 || spec.num_q != spec.num_k || spec.num_q % b != 0) return 0;
  const int64_t s = spec.num_q / b;
  for (int64_t n = 0; n < b; ++n) {
    const auto& sl = spec.slices[n];
    if (sl.mask != MaskType::Causal || !(sl.q == Range{n * s, (n + 1) * s}) || !(sl.k == sl.q)) return 0;
  }
  return b;
}

at::Tensor attend_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                       double scale) {
  const int64_t group = q.size(1) / k.size(1);
  auto qf = q.to(at::kFloat).permute({1, 0, 2});
  auto kf = k.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(group, 0);
  auto vf = v.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(group, 0);
  std::vector<at::Tensor> pieces;
  int64_t row = 0;
  auto zeros_rows = [&](int64_t n) { return at::zeros({qf.size(0), n, qf.size(2)}, qf.options()); };
  for (const auto& blk : attention_blocks(spec)) {
    if (blk.q.start > row) pieces.push_back(zeros_rows(blk.q.start - row));
    auto mask = block_dense_mask(spec, blk, q.device());
    auto s = at::matmul(qf.narrow(1, blk.q.start, blk.q.size()), kf.narrow(1, blk.k.start, blk.k.size()).transpose(1, 2)) * scale;
    // A finite fill keeps softmax free of NaN; rows that see no key are zeroed by `seen`.
    auto p = at::softmax(s.masked_fill(mask.logical_not(), -1e30), -1);
    auto seen = mask.any(-1, /*keepdim=*/true).to(at::kFloat);
    pieces.push_back(at::matmul(p * seen, vf.narrow(1, blk.k.start, blk.k.size())));
    row = blk.q.end;
  }
  if (row < spec.num_q) pieces.push_back(zeros_rows(spec.num_q - row));
  return at::cat(pieces, 1).permute({1, 0, 2}).to(q.scalar_type());
}

class TorchBackend final : public AttentionBackend {
 public:
  std::string name() const override { return "torch"; }
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                    double scale) override {
    check_attention_shapes(q, k, v, spec);
#if TORCH_VERSION_MAJOR >= 2
    if (const int64_t b = uniform_causal_samples(spec)) {
      const int64_t s = spec.num_q / b, d = q.size(2);
      auto q4 = q.view({b, s, q.size(1), d}).transpose(1, 2);
      auto k4 = k.view({b, s, k.size(1), d}).transpose(1, 2);
      auto v4 = v.view({b, s, v.size(1), d}).transpose(1, 2);
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 5
      auto o = at::scaled_dot_product_attention(q4, k4, v4, {}, 0.0, true, scale, /*enable_gqa=*/q.size(1) != k.size(1));
#else
      const int64_t group = q.size(1) / k.size(1);
      auto o = at::scaled_dot_product_attention(q4, k4.repeat_interleave(group, 1), v4.repeat_interleave(group, 1), {},
                                                0.0, true, scale);
#endif
      return o.transpose(1, 2).reshape({b * s, q.size(1), d});
    }
#endif
    return attend_math(q, k, v, spec, scale);
  }
};

}  // namespace

std::shared_ptr<AttentionBackend> make_torch_backend() { return std::make_shared<TorchBackend>(); }

}  // namespace flexcp
