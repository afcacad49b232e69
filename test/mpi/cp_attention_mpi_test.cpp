// Distributed attention against the single-rank result: every rank builds the same global q, k, v
// and dout, computes the fp32 reference on the whole sequence, then runs its share through the CP
// kernel (group-cast, staged merge, group-reduce) and compares its rows of out, lse, dq, dk, dv.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>

#include <catch2/catch.hpp>
#include <iostream>
#include <limits>

#include "core/attention_backend.h"
#include "core/cp_attention.h"
#include "core/cp_dispatch.h"
#include "test/mpi/worlds.h"

using namespace flexcp;

namespace {

struct Named {
  std::string name;
  AttentionSpec spec;
};

// Every mask type, unequal q/k lengths (rows with no key at all included) and a second sample.
AttentionSpec mixed_spec(int64_t half) {
  AttentionSpec spec;
  spec.num_q = spec.num_k = 2 * half;
  const int64_t a = half / 4, b = half / 2, c = 3 * half / 4;
  spec.slices.push_back({{0, b}, {0, a}, MaskType::Causal});
  spec.slices.push_back({{0, a}, {a, c}, MaskType::InvCausal});
  spec.slices.push_back({{b, half}, {0, b}, MaskType::BiCausal});
  spec.slices.push_back({{b, half}, {b, half}, MaskType::Causal});
  spec.slices.push_back({{a, b}, {c, half}, MaskType::Full});
  spec.slices.push_back({{half, 2 * half}, {half, 2 * half}, MaskType::Causal});
  return spec;
}

std::vector<Named> specs(int64_t T) {
  return {{"causal", spec_causal(T)},
          {"full", AttentionSpec{{{{0, T}, {0, T}, MaskType::Full}}, T, T}},
          {"documents", spec_documents({0, 5, 37, 40, 90, 91, 150}, T)},
          {"one-token documents", spec_documents({0, 1, 2, 3, 17, 18, 96, 97, 99, 100, 101, 190, 191}, T)},
          {"mixed", mixed_spec(T / 2)}};
}

// max |a - b| relative to max(1, max |b|); -inf must match -inf.
double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor fa = a.to(at::kDouble), fb = b.to(at::kDouble);
  const at::Tensor ia = at::isinf(fa), ib = at::isinf(fb);
  if (!at::equal(ia, ib)) return std::numeric_limits<double>::infinity();
  fa = at::where(ia, at::zeros_like(fa), fa);
  fb = at::where(ib, at::zeros_like(fb), fb);
  const double scale = std::max(1.0, fb.abs().max().item<double>());
  return (fa - fb).abs().max().item<double>() / scale;
}

struct Diffs {
  double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
  double worst() const { return std::max({out, lse, dq, dk, dv}); }
};

Diffs run_case(const std::shared_ptr<Communicator>& world, const AttentionSpec& spec, int64_t cp, int64_t chunk,
               int64_t stages, bool through_autograd) {
  auto ctx = cp_context_create(world, cp, {cp, chunk, stages});
  const int64_t T = spec.num_q, hq = 4, hkv = 2, d = 16;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // The same data on the ranks of one cp group; other dp groups get other data.
  auto gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(ctx->dp_rank));
  at::Tensor q = at::randn({T, hq, d}, gen), k = at::randn({T, hkv, d}, gen), v = at::randn({T, hkv, d}, gen);
  at::Tensor dout = at::randn({T, hq, d}, gen);
  auto ref = make_reference_kernel();
  const AttnForward rf = ref->forward(q, k, v, spec, scale);
  const AttnGrads rg = ref->backward(dout, q, k, v, rf.out, rf.lse, spec, scale);

  auto plan = ctx->planner->plan_for(spec);
  const int r = static_cast<int>(ctx->cp_rank);
  auto mine = [&](const at::Tensor& t) { return cp_dispatch_rows(*plan, r, t).contiguous(); };
  at::Tensor ql = mine(q), kl = mine(k), vl = mine(v), dl = mine(dout);
  auto kernel = make_cp_attention_kernel(ref, ctx);
  Diffs df;
  if (!through_autograd) {
    const AttnForward f = kernel->forward(ql, kl, vl, spec, scale);
    const AttnGrads g = kernel->backward(dl, ql, kl, vl, f.out, f.lse, spec, scale);
    df.out = rel_diff(f.out, mine(rf.out));
    df.lse = rel_diff(f.lse, mine(rf.lse));
    df.dq = rel_diff(g.dq, mine(rg.dq));
    df.dk = rel_diff(g.dk, mine(rg.dk));
    df.dv = rel_diff(g.dv, mine(rg.dv));
  } else {
    auto backend = backend_from_kernel(kernel);
    ql.requires_grad_(true);
    kl.requires_grad_(true);
    vl.requires_grad_(true);
    at::Tensor out = backend->attend(ql, kl, vl, spec, scale);
    out.backward(dl);
    df.out = rel_diff(out.detach(), mine(rf.out));
    df.dq = rel_diff(ql.grad(), mine(rg.dq));
    df.dk = rel_diff(kl.grad(), mine(rg.dk));
    df.dv = rel_diff(vl.grad(), mine(rg.dv));
  }
  return df;
}

}  // namespace

TEST_CASE("cp attention: out, lse, dq, dk, dv equal the single-rank reference", "[mpi][cp]") {
  const int64_t T = 192;
  double worst = 0;
  int cases = 0;
  for (const auto& world : flexcp_test::all_worlds()) {
    const int64_t ws = world->size();
    for (int64_t cp = 1; cp <= ws; cp *= 2) {
      if (ws % cp) continue;
      for (const auto& sp : specs(T)) {
        for (int64_t chunk : {0, 4, 12, 24}) {
          if (chunk && T % (cp * chunk)) continue;
          for (int64_t stages : {1, 3}) {
            const Diffs df = run_case(world, sp.spec, cp, chunk, stages, false);
            INFO(world->backend() << " rank " << world->rank() << ": " << sp.name << ", cp=" << cp << ", chunk=" << chunk
                                  << ", stages=" << stages << ": out " << df.out << ", lse " << df.lse << ", dq " << df.dq
                                  << ", dk " << df.dk << ", dv " << df.dv);
            CHECK(df.worst() <= 1e-5);
            worst = std::max(worst, df.worst());
            ++cases;
          }
        }
      }
    }
  }
  std::cout << "[cp attention] rank " << flexcp_test::mpi_world()->rank() << " of " << flexcp_test::mpi_world()->size()
            << ": " << cases << " cases (mpi + tcp, cp | world, causal/full/documents/mixed, chunks 0/4/12/24, "
            << "stages 1/3), worst relative difference vs single rank " << worst << "\n";
}

TEST_CASE("cp attention: through the differentiable backend (autograd)", "[mpi][cp]") {
  const auto world = flexcp_test::mpi_world();
  const int64_t cp = world->size();
  for (const auto& sp : specs(192)) {
    const Diffs df = run_case(world, sp.spec, cp, 0, 2, true);
    INFO(sp.name << ": out " << df.out << ", dq " << df.dq << ", dk " << df.dk << ", dv " << df.dv);
    CHECK(df.worst() <= 1e-5);
  }
}

TEST_CASE("cp attention: bytes moved match the plan and never exceed ring attention", "[mpi][cp]") {
  const auto world = flexcp_test::mpi_world();
  const int64_t cp = world->size(), T = 192;
  for (const auto& sp : specs(T)) {
    auto ctx = cp_context_create(world, cp, {cp, 0, 0});
    auto kernel = make_cp_attention_kernel(make_reference_kernel(), ctx);
    const int64_t hq = 4, hkv = 2, d = 16;
    at::Tensor q = at::randn({T / cp, hq, d}), k = at::randn({T / cp, hkv, d}), v = at::randn({T / cp, hkv, d});
    const AttnForward f = kernel->forward(q, k, v, sp.spec, 0.25);
    kernel->backward(at::ones_like(f.out), q, k, v, f.out, f.lse, sp.spec, 0.25);
    const auto plan = ctx->planner->plan_for(sp.spec);
    const CpCommVolume vol = cp_comm_volume(*plan);
    const int64_t kv_row = 2 * hkv * d * 4;
    CHECK(ctx->stats.forward_sent == vol.send_tokens[ctx->cp_rank] * kv_row);
    CHECK(ctx->stats.forward_received == vol.recv_tokens[ctx->cp_rank] * kv_row);
    // Backward: K/V again, then dK/dV (fp32) the other way.
    CHECK(ctx->stats.backward_sent == vol.send_tokens[ctx->cp_rank] * kv_row + vol.recv_tokens[ctx->cp_rank] * kv_row);
    CHECK(ctx->stats.forward_sent <= vol.ring_send_tokens * kv_row);
    if (world->rank() == 0) {
      std::cout << "[cp attention] " << sp.name << ", " << T << " tokens, cp=" << cp << "\n"
                << cp_comm_report(*plan, hkv, d, 4) << "\n"
                << cp_stats_report(*ctx) << "\n";
    }
  }
}

TEST_CASE("cp attention: merging partial results over split keys is exact", "[mpi][cp]") {
  // Not multi-process, but the merge is the heart of the staged forward; -inf parts included.
  const int64_t T = 32;
  at::Tensor q = at::randn({T, 2, 8}), k = at::randn({T, 2, 8}), v = at::randn({T, 2, 8});
  auto ref = make_reference_kernel();
  const AttentionSpec whole = spec_causal(T);
  AttentionSpec left;  // keys 0..9
  left.num_q = T;
  left.num_k = 10;
  left.slices.push_back({{0, 10}, {0, 10}, MaskType::Causal});
  left.slices.push_back({{10, T}, {0, 10}, MaskType::Full});
  AttentionSpec right{{{{10, T}, {0, T - 10}, MaskType::Causal}}, T, T - 10};
  const AttnForward w = ref->forward(q, k, v, whole, 0.3);
  AttnForward a = ref->forward(q, k.narrow(0, 0, 10), v.narrow(0, 0, 10), left, 0.3);
  const AttnForward b = ref->forward(q, k.narrow(0, 10, T - 10), v.narrow(0, 10, T - 10), right, 0.3);
  CHECK(at::isinf(b.lse).any().item<bool>());  // rows 0..9 see nothing on the right
  at::Tensor out = a.out.clone(), lse = a.lse.clone();
  attn_merge_into(out, lse, b.out, b.lse);
  CHECK(rel_diff(out, w.out) < 1e-6);
  CHECK(rel_diff(lse, w.lse) < 1e-6);
  // Two empty parts stay empty: out 0, lse -inf, no NaN.
  at::Tensor eo = at::zeros({3, 2, 8}), el = at::full({3, 2}, -std::numeric_limits<float>::infinity());
  attn_merge_into(eo, el, at::zeros({3, 2, 8}), at::full({3, 2}, -std::numeric_limits<float>::infinity()));
  CHECK(at::equal(eo, at::zeros({3, 2, 8})));
  CHECK(at::isinf(el).all().item<bool>());
}
