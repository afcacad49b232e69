// The `ffa` AttentionKernel (core/attention_ffa_cuda.cpp) against the fp32 reference kernel on the
// GPU, through the LibTorch interface the model and context parallelism use. The kernels' own
// exhaustive check (random slice sets, every mask type, GQA 1/4/8, the bf16 error convention) is
// test/gpu/ffa_check.py; this one proves the LibTorch glue: strides, dtypes, plan cache, GQA sums,
// rows with no key, and the deterministic mode. Tagged [gpu]: the CPU CI never selects it.
#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cmath>

#include "core/attention_backend.h"
#include "core/attention_ffa.h"
#include "core/attention_spec.h"
#include "core/cp_attention.h"

namespace {

using namespace flexcp;

// fp32 dense reference with explicit backward formulas (independent of the kernels' tiling and of
// the other back-ends): P = softmax(scale * q k^T) over visible keys, dS = P * (dP - rowsum(dO * O)).
struct Ref {
  at::Tensor out, lse, dq, dk, dv;
};

Ref reference(const at::Tensor& q16, const at::Tensor& k16, const at::Tensor& v16, const at::Tensor& do16,
              const AttentionSpec& spec, double scale) {
  const at::Tensor q = q16.to(at::kFloat), dout = do16.to(at::kFloat);
  const int64_t g = q.size(1) / k16.size(1);
  const at::Tensor k = k16.to(at::kFloat).repeat_interleave(g, 1), v = v16.to(at::kFloat).repeat_interleave(g, 1);
  at::Tensor mask = at::zeros({spec.num_q, spec.num_k}, at::kBool);
  auto m = mask.accessor<bool, 2>();
  for (int64_t i = 0; i < spec.num_q; ++i)
    for (const auto& s : spec.slices) {
      const Range r = slice_row_keys(s, i);
      for (int64_t j = r.start; j < r.end; ++j) m[i][j] = true;
    }
  mask = mask.to(q.device());
  const at::Tensor has = mask.any(1);  // (Tq)
  at::Tensor s = at::einsum("qhd,khd->hqk", {q, k}) * scale;
  s = s.masked_fill(mask.logical_not().unsqueeze(0), -1e30);
  at::Tensor lse = at::logsumexp(s, {-1});
  const at::Tensor p = at::exp(s - lse.unsqueeze(-1)) * has.unsqueeze(0).unsqueeze(-1);
  Ref r;
  r.out = at::einsum("hqk,khd->qhd", {p, v});
  r.lse = at::where(has.unsqueeze(0), lse, at::full_like(lse, -INFINITY)).transpose(0, 1);
  const at::Tensor dp = at::einsum("qhd,khd->hqk", {dout, v});
  const at::Tensor delta = (dout * r.out).sum(-1).transpose(0, 1);  // (H, Tq)
  const at::Tensor ds = p * (dp - delta.unsqueeze(-1));
  r.dq = at::einsum("hqk,khd->qhd", {ds, k}) * scale;
  const int64_t tk = k.size(0), hkv = k16.size(1), d = k.size(2);
  r.dk = (at::einsum("hqk,qhd->khd", {ds, q}) * scale).view({tk, hkv, g, d}).sum(2);
  r.dv = at::einsum("hqk,qhd->khd", {p, dout}).view({tk, hkv, g, d}).sum(2);
  return r;
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;  // e.g. no finite lse at all (a BI_CAUSAL slice with Lq > Lk sees nothing)
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

void compare(const AttentionSpec& spec, int64_t hq, int64_t hkv, int64_t d, at::ScalarType dt, bool det) {
  spec_validate(spec);
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(dt);
  at::Tensor q = at::randn({spec.num_q, hq, d}, opt), k = at::randn({spec.num_k, hkv, d}, opt),
             v = at::randn({spec.num_k, hkv, d}, opt), dout = at::randn({spec.num_q, hq, d}, opt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  FfaOptions fo;
  fo.deterministic = det;
  auto ffa = make_ffa_kernel(fo);
  const auto f = ffa->forward(q, k, v, spec, scale);
  const auto g = ffa->backward(dout, q, k, v, f.out, f.lse, spec, scale);
  const Ref r = reference(q, k, v, dout, spec, scale);
  const Ref& rg = r;
  // bf16/fp16 outputs: a few units in the last place of values of order 1.
  const double tol = dt == at::kHalf ? 5e-3 : 3e-2;
  CHECK(max_err(f.out, r.out) < tol);
  const at::Tensor finite = at::isfinite(r.lse);
  CHECK(at::equal(finite, at::isfinite(f.lse)));
  CHECK(max_err(f.lse.masked_select(finite), r.lse.masked_select(finite)) < 1e-2);
  const double gscale = std::max(1.0, rg.dk.abs().max().item<double>());
  CHECK(max_err(g.dq, rg.dq) < 4 * tol * gscale);
  CHECK(max_err(g.dk, rg.dk) < 4 * tol * gscale);
  CHECK(max_err(g.dv, rg.dv) < 4 * tol * gscale);
  if (det) {
    const auto g2 = ffa->backward(dout, q, k, v, f.out, f.lse, spec, scale);
    CHECK(at::equal(g.dq, g2.dq));
    CHECK(at::equal(g.dk, g2.dk));
    CHECK(at::equal(g.dv, g2.dv));
  }
}

}  // namespace

TEST_CASE("ffa kernel matches the reference: causal, documents, CP chunk, GQA", "[gpu][ffa]") {
  compare(spec_causal(300), 4, 4, 64, at::kBFloat16, false);
  compare(spec_documents({0, 17, 100, 101, 250}, 400), 8, 2, 128, at::kBFloat16, false);
  AttentionSpec cp;  // a context-parallel rank's chunk [200, 330) of a causal sequence, keys in 2 parts
  cp.num_q = 330;
  cp.num_k = 330;
  cp.slices = {{{200, 330}, {0, 120}, MaskType::Full},
               {{200, 330}, {120, 200}, MaskType::Full},
               {{200, 330}, {200, 330}, MaskType::Causal}};
  compare(cp, 8, 1, 64, at::kHalf, false);
  compare(cp, 8, 1, 128, at::kBFloat16, true);
}

TEST_CASE("ffa kernel: Lq != Lk for every mask type, rows with no key", "[gpu][ffa]") {
  for (auto m : {MaskType::Full, MaskType::Causal, MaskType::InvCausal, MaskType::BiCausal}) {
    AttentionSpec s;
    s.num_q = 190;
    s.num_k = 77;
    s.slices = {{{10, 190}, {0, 77}, m}};  // rows 0..9 see nothing
    compare(s, 4, 2, 64, at::kBFloat16, m == MaskType::BiCausal);
    s.num_q = 77;
    s.num_k = 190;
    s.slices = {{{0, 77}, {0, 190}, m}};
    compare(s, 4, 4, 128, at::kHalf, false);
  }
}

TEST_CASE("ffa kernel refuses fp32 and CPU tensors with a clear message", "[gpu][ffa]") {
  auto ffa = make_ffa_kernel();
  const auto spec = spec_causal(16);
  auto q = at::randn({16, 2, 64}, at::TensorOptions().device(at::kCUDA));
  CHECK_THROWS_WITH(ffa->forward(q, q, q, spec, 0.125), Catch::Contains("bf16 or fp16"));
  auto c = at::randn({16, 2, 64});
  CHECK_THROWS_WITH(ffa->forward(c, c, c, spec, 0.125), Catch::Contains("CUDA"));
}

TEST_CASE("ffa merge_into and StageForwardSum: key parts merged equal attention over all keys", "[gpu][ffa]") {
  // Queries [200, 330) of a causal sequence of 330 (rows 0..199 see no key in any part): keys split
  // into [0, 120), [120, 200) (full) and [200, 330) (causal), as CP's stages see them.
  AttentionSpec all;
  all.num_q = 330;
  all.num_k = 330;
  all.slices = {{{200, 330}, {0, 330}, MaskType::Causal}};
  const auto part_spec = [](int64_t k0, int64_t k1, MaskType m) {
    AttentionSpec s;
    s.num_q = 330;
    s.num_k = k1 - k0;
    s.slices = {{{200, 330}, {0, k1 - k0}, m}};
    return s;
  };
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const at::Tensor q = at::randn({330, 8, 64}, opt), k = at::randn({330, 2, 64}, opt), v = at::randn({330, 2, 64}, opt);
  const double scale = 0.125;
  auto ffa = make_ffa_kernel();
  const Ref r = reference(q, k, v, at::zeros_like(q), all, scale);
  const auto part = [&](int64_t k0, int64_t k1, MaskType m) {
    return ffa->forward(q, k.narrow(0, k0, k1 - k0), v.narrow(0, k0, k1 - k0), part_spec(k0, k1, m), scale);
  };
  const at::Tensor finite = at::isfinite(r.lse);
  const auto check_like_reference = [&](const AttnForward& f) {
    CHECK(f.out.scalar_type() == at::kBFloat16);
    CHECK(max_err(f.out, r.out) < 3e-2);
    CHECK(at::equal(finite, at::isfinite(f.lse)));
    CHECK(max_err(f.lse.masked_select(finite), r.lse.masked_select(finite)) < 1e-2);
    CHECK(max_err(f.out.narrow(0, 0, 200), at::zeros({200, 8, 64}, opt)) == 0.0);  // no key: out 0
  };
  SECTION("two parts of one dtype: the fused merge, in place") {
    AttnForward acc = part(0, 200, MaskType::Full);
    const void* before = acc.out.data_ptr();
    ffa->merge_into(acc, part(200, 330, MaskType::Causal));
    CHECK(acc.out.data_ptr() == before);
    check_like_reference(acc);
  }
  SECTION("three parts: fp32 between merges, one rounding at the end") {
    StageForwardSum sum{ffa.get(), 2, {}};
    sum.add(0, part(0, 120, MaskType::Full));
    sum.add(1, part(120, 200, MaskType::Full));
    CHECK(sum.acc.out.scalar_type() == at::kFloat);
    sum.add(2, part(200, 330, MaskType::Causal));
    check_like_reference(sum.result(q));
  }
}
