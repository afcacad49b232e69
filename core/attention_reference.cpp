// The fp32 reference kernel: attention over any spec by dense math, one independent block at a time.
// It is the ground truth for the FFA kernels and the CPU path for context parallelism.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "core/attention_backend.h"
#include "core/attention_blocks.h"

namespace flexcp {
namespace {

// Scores of one block with masked entries at -inf: (Hq, rows, keys), fp32.
at::Tensor block_scores(const at::Tensor& qf, const at::Tensor& kf, const AttentionBlock& blk,
                        const AttentionSpec& spec, double scale) {
  auto qb = qf.narrow(1, blk.q.start, blk.q.size());
  auto kb = kf.narrow(1, blk.k.start, blk.k.size());
  auto s = at::matmul(qb, kb.transpose(1, 2)).mul_(scale);
  auto mask = block_dense_mask(spec, blk, qf.device());
  return s.masked_fill_(mask.logical_not(), -std::numeric_limits<float>::infinity());
}

// exp(s - lse) with rows that see no key (lse = -inf) giving 0 instead of NaN.
at::Tensor block_probs(const at::Tensor& s, const at::Tensor& lse) {
  auto safe = at::where(at::isinf(lse), at::zeros_like(lse), lse);
  return at::exp(s - safe.unsqueeze(-1));
}

class ReferenceKernel final : public AttentionKernel {
 public:
  std::string name() const override { return "reference"; }

  AttnForward forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                      double scale) override {
    check_attention_shapes(q, k, v, spec);
    const int64_t tq = q.size(0), hq = q.size(1), hkv = k.size(1);
    auto qf = q.to(at::kFloat).permute({1, 0, 2});                                   // (Hq, Tq, D)
    auto kf = k.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(hq / hkv, 0);   // (Hq, Tk, D)
    auto vf = v.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(hq / hkv, 0);
    auto out = at::zeros({hq, tq, q.size(2)}, qf.options());
    auto lse = at::full({hq, tq}, -std::numeric_limits<float>::infinity(), qf.options());
    for (const auto& blk : attention_blocks(spec)) {
      auto s = block_scores(qf, kf, blk, spec, scale);
      auto l = at::logsumexp(s, -1);
      auto p = block_probs(s, l);
      out.narrow(1, blk.q.start, blk.q.size()).copy_(at::matmul(p, vf.narrow(1, blk.k.start, blk.k.size())));
      lse.narrow(1, blk.q.start, blk.q.size()).copy_(l);
    }
    return {out.permute({1, 0, 2}).to(q.scalar_type()).contiguous(), lse.transpose(0, 1).contiguous()};
  }

  AttnGrads backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const AttentionSpec& spec,
                     double scale) override {
    const int64_t hq = q.size(1), hkv = k.size(1), group = hq / hkv, tk = k.size(0), d = q.size(2);
    auto qf = q.to(at::kFloat).permute({1, 0, 2});
    auto kf = k.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(group, 0);
    auto vf = v.to(at::kFloat).permute({1, 0, 2}).repeat_interleave(group, 0);
    auto dof = dout.to(at::kFloat).permute({1, 0, 2});
    auto lsef = lse.to(at::kFloat).transpose(0, 1);                                    // (Hq, Tq)
    auto delta = (dof * out.to(at::kFloat).permute({1, 0, 2})).sum(-1);               // (Hq, Tq)
    auto dq = at::zeros_like(qf);
    auto dk = at::zeros({hq, tk, d}, qf.options());
    auto dv = at::zeros({hq, tk, d}, qf.options());
    for (const auto& blk : attention_blocks(spec)) {
      auto s = block_scores(qf, kf, blk, spec, scale);
      auto p = block_probs(s, lsef.narrow(1, blk.q.start, blk.q.size()));
      auto dob = dof.narrow(1, blk.q.start, blk.q.size());
      auto vb = vf.narrow(1, blk.k.start, blk.k.size());
      auto dp = at::matmul(dob, vb.transpose(1, 2));
      auto ds = p * (dp - delta.narrow(1, blk.q.start, blk.q.size()).unsqueeze(-1));
      dq.narrow(1, blk.q.start, blk.q.size()).add_(at::matmul(ds, kf.narrow(1, blk.k.start, blk.k.size())), scale);
      dk.narrow(1, blk.k.start, blk.k.size()).add_(at::matmul(ds.transpose(1, 2), qf.narrow(1, blk.q.start, blk.q.size())), scale);
      dv.narrow(1, blk.k.start, blk.k.size()).add_(at::matmul(p.transpose(1, 2), dob));
    }
    // GQA: the query heads of one group share a kv head, so their gradients add up.
    dk = dk.view({hkv, group, tk, d}).sum(1);
    dv = dv.view({hkv, group, tk, d}).sum(1);
    return {dq.permute({1, 0, 2}).to(q.scalar_type()).contiguous(), dk.permute({1, 0, 2}).to(k.scalar_type()).contiguous(),
            dv.permute({1, 0, 2}).to(v.scalar_type()).contiguous()};
  }
};

}  // namespace

std::shared_ptr<AttentionKernel> make_reference_kernel() { return std::make_shared<ReferenceKernel>(); }

}  // namespace flexcp
