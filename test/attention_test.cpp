// The attention spec helpers, the fp32 reference kernel and the torch backend, checked against a
// naive per-element implementation in double and against each other's autograd.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>

#include "core/attention_backend.h"
#include "core/attention_spec.h"
#include "core/errors.h"

using namespace flexcp;

namespace {

// Naive attention in double, straight from the spec doc's visibility table.
void naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                     double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t tq = q.size(0), hq = q.size(1), tk = k.size(0), hkv = k.size(1), d = q.size(2);
  auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  auto qa = qd.accessor<double, 3>(), ka = kd.accessor<double, 3>(), va = vd.accessor<double, 3>();
  out = at::zeros({tq, hq, d}, at::kDouble);
  lse = at::full({tq, hq}, -std::numeric_limits<double>::infinity(), at::kDouble);
  auto oa = out.accessor<double, 3>();
  auto la = lse.accessor<double, 2>();
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t hk = h / (hq / hkv);
    for (int64_t i = 0; i < tq; ++i) {
      std::vector<std::pair<int64_t, double>> seen;
      for (const auto& s : spec.slices)
        for (int64_t j = 0; j < tk; ++j)
          if (slice_visible(s, i, j)) {
            double dot = 0;
            for (int64_t c = 0; c < d; ++c) dot += qa[i][h][c] * ka[j][hk][c];
            seen.push_back({j, dot * scale});
          }
      if (seen.empty()) continue;
      double m = -1e300;
      for (auto& p : seen) m = std::max(m, p.second);
      double sum = 0;
      for (auto& p : seen) sum += std::exp(p.second - m);
      la[i][h] = m + std::log(sum);
      for (auto& p : seen) {
        const double w = std::exp(p.second - la[i][h]);
        for (int64_t c = 0; c < d; ++c) oa[i][h][c] += w * va[p.first][hk][c];
      }
    }
  }
}

AttentionSpec random_spec(std::mt19937& rng, int64_t tq, int64_t tk) {
  // Slices on a grid of disjoint q and k cells, so they never overlap; every mask type, Lq != Lk.
  AttentionSpec spec;
  spec.num_q = tq;
  spec.num_k = tk;
  std::uniform_int_distribution<int> mask(0, 3), coin(0, 2);
  const int64_t qcut = tq / 2, kcut = tk / 3;
  const Range qs[2] = {{0, qcut}, {qcut, tq}};
  const Range ks[3] = {{0, kcut}, {kcut, 2 * kcut + 1}, {2 * kcut + 1, tk}};
  for (const auto& qr : qs)
    for (const auto& kr : ks)
      if (coin(rng)) spec.slices.push_back({qr, kr, static_cast<MaskType>(mask(rng))});
  spec.slices.push_back({{3, 3}, {0, 5}, MaskType::Full});  // an empty slice does nothing
  return spec;
}

}  // namespace

TEST_CASE("slice visibility and area follow the spec table", "[attention]") {
  AttnSlice causal{{0, 4}, {0, 6}, MaskType::Causal};  // d = 2: row 0 sees keys 0..2
  CHECK(slice_row_keys(causal, 0).size() == 3);
  CHECK(slice_row_keys(causal, 3).size() == 6);
  CHECK(slice_area(causal) == 3 + 4 + 5 + 6);
  AttnSlice inv{{0, 4}, {0, 6}, MaskType::InvCausal};  // row a sees b >= a
  CHECK(slice_area(inv) == 6 + 5 + 4 + 3);
  AttnSlice bi{{0, 4}, {0, 6}, MaskType::BiCausal};    // a <= b <= a + 2
  CHECK(slice_area(bi) == 12);
  AttnSlice tall{{0, 6}, {0, 2}, MaskType::Causal};    // d = -4: rows 0..3 see nothing
  CHECK(slice_area(tall) == 1 + 2);
  CHECK(spec_area(spec_causal(8192)) == int64_t(8192) * 8193 / 2);
}

TEST_CASE("spec_validate rejects overlap and out-of-bounds slices", "[attention]") {
  AttentionSpec spec = spec_causal(16);
  spec_validate(spec);
  spec.slices.push_back({{8, 16}, {0, 4}, MaskType::Full});  // below the diagonal: overlaps the causal slice
  CHECK_THROWS_WITH(spec_validate(spec), Catch::Contains("overlaps"));
  AttentionSpec split;  // the CP chunk form of a causal sequence is legal
  split.num_q = split.num_k = 16;
  split.slices = {{{0, 8}, {0, 8}, MaskType::Causal}, {{8, 16}, {0, 8}, MaskType::Full}, {{8, 16}, {8, 16}, MaskType::Causal}};
  spec_validate(split);
  AttentionSpec oob = spec_causal(8);
  oob.slices[0].k.end = 9;
  CHECK_THROWS_AS(spec_validate(oob), UserError);
}

TEST_CASE("reference kernel matches naive attention for random specs, GQA and Lq != Lk", "[attention]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 6; ++trial) {
    const int64_t tq = 19 + trial * 3, tk = 23 + trial * 2, hq = 4, hkv = trial % 2 ? 2 : 1, d = 8;
    auto spec = random_spec(rng, tq, tk);
    spec_validate(spec);
    at::manual_seed(trial);
    auto q = at::randn({tq, hq, d}), k = at::randn({tk, hkv, d}), v = at::randn({tk, hkv, d});
    auto res = make_reference_kernel()->forward(q, k, v, spec, 0.3);
    at::Tensor out, lse;
    naive_attention(q, k, v, spec, 0.3, out, lse);
    CHECK(at::allclose(res.out.to(at::kDouble), out, 1e-5, 1e-5));
    auto finite = at::isfinite(lse);
    CHECK(at::equal(at::isfinite(res.lse), finite));
    CHECK(at::allclose(res.lse.to(at::kDouble).masked_fill(finite.logical_not(), 0), lse.masked_fill(finite.logical_not(), 0), 1e-5, 1e-5));
  }
}

TEST_CASE("reference kernel gradients equal autograd through the torch backend", "[attention]") {
  std::mt19937 rng(11);
  auto torch_backend = make_attention_backend("torch");
  auto ref_backend = make_attention_backend("reference");
  for (int trial = 0; trial < 4; ++trial) {
    const int64_t tq = 17 + trial, tk = 29 - trial, hq = 4, hkv = 2, d = 8;
    auto spec = random_spec(rng, tq, tk);
    at::manual_seed(100 + trial);
    auto q = at::randn({tq, hq, d}).requires_grad_(), k = at::randn({tk, hkv, d}).requires_grad_(),
         v = at::randn({tk, hkv, d}).requires_grad_();
    auto dout = at::randn({tq, hq, d});
    auto o1 = ref_backend->attend(q, k, v, spec, 0.25);
    auto g1 = torch::autograd::grad({o1}, {q, k, v}, {dout});
    auto o2 = torch_backend->attend(q, k, v, spec, 0.25);
    auto g2 = torch::autograd::grad({o2}, {q, k, v}, {dout});
    CHECK(at::allclose(o1, o2, 1e-5, 1e-5));
    for (int n = 0; n < 3; ++n) {
      CHECK(at::allclose(g1[n], g2[n], 1e-4, 1e-5));
      CHECK(at::isfinite(g1[n]).all().item<bool>());
    }
  }
}

TEST_CASE("rows that see no key give out 0, lse -inf and zero gradients", "[attention]") {
  AttentionSpec spec;
  spec.num_q = 6;
  spec.num_k = 4;
  spec.slices = {{{0, 6}, {0, 4}, MaskType::Causal}};  // rows 0 and 1 see nothing (d = -2)
  auto q = at::randn({6, 2, 4}).requires_grad_(), k = at::randn({4, 2, 4}).requires_grad_(),
       v = at::randn({4, 2, 4}).requires_grad_();
  auto res = make_reference_kernel()->forward(q.detach(), k.detach(), v.detach(), spec, 0.5);
  CHECK(res.out.narrow(0, 0, 2).abs().sum().item<float>() == 0.0f);
  CHECK(std::isinf(res.lse[0][0].item<float>()));
  CHECK(res.lse[0][0].item<float>() < 0);
  auto o = make_attention_backend("reference")->attend(q, k, v, spec, 0.5);
  auto g = torch::autograd::grad({o.sum()}, {q});
  CHECK(g[0].narrow(0, 0, 2).abs().sum().item<float>() == 0.0f);
  CHECK(at::isfinite(g[0]).all().item<bool>());
}

TEST_CASE("unknown attention backends are rejected with the choices", "[attention]") {
  CHECK_THROWS_WITH(make_attention_backend("flash"), Catch::Contains("choose reference, torch or ffa"));
}
