// The fused CUDA ops (core/fused_ops.h, cuda/train_kernels.h) against the torch composites they
// replace. Each op runs three ways on the same bf16 inputs: fused, the torch composite in bf16, and
// the torch composite in fp32 (the reference). The fused result passes when
//   max|fused - fp32 ref| <= 2 * max|bf16 composite - fp32 ref| + 1e-3 * max|fp32 ref|
// for the outputs and every gradient (the convention of test/gpu/ffa_check.py). Then tiny Llamas'
// loss and parameter gradients (bf16, with and without the fused ops, against the fp32 model) by the
// same rule in whole-tensor norms with atol 5e-3 * |g|, plus cosine > 0.99, and activation
// checkpointing must not change the fused gradients, also with the parameters in FlatAdamW's one
// buffer (the packed q|k|v and gate|up projections). The fused residual add + RMSNorm must also give
// torch's bf16 add and the plain fused norm bit for bit. Tagged [gpu].
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "core/attention_backend.h"
#include "core/attention_spec.h"
#include "core/fused_ops.h"
#include "core/hf_config.h"
#include "core/hf_weights.h"
#include "core/llama_model.h"
#include "core/optimizer.h"
#include "core/rope.h"

using namespace flexcp;

namespace {

// Restores the process-wide switch when a test ends, whatever it set.
struct FusedSwitch {
  bool saved = fused_ops_enabled();
  ~FusedSwitch() { fused_ops_set_enabled(saved); }
};

at::TensorOptions cuda(at::ScalarType t) { return at::TensorOptions().device(at::kCUDA).dtype(t); }

double max_err(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.defined());
  REQUIRE(b.defined());
  REQUIRE(a.sizes() == b.sizes());
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// The pass rule of this file (see the top).
void check_2x(const std::string& what, const at::Tensor& fused, const at::Tensor& composite_bf16,
              const at::Tensor& ref32) {
  const double scale = ref32.numel() ? ref32.to(at::kDouble).abs().max().item<double>() : 0.0;
  const double ef = max_err(fused, ref32), ec = max_err(composite_bf16, ref32);
  INFO(what << ": fused err " << ef << ", bf16 composite err " << ec << ", max|ref| " << scale);
  CHECK(std::isfinite(ef));
  CHECK(ef <= 2 * ec + 1e-3 * scale);
}

at::Tensor leaf(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).detach().requires_grad_(true); }

// ---- RMSNorm through the model's module, so "composite" is exactly RMSNormImpl's formula.
struct NormOut {
  at::Tensor y, dx, dw;
};

NormOut run_norm(const at::Tensor& x0, const at::Tensor& w0, const at::Tensor& dy0, at::ScalarType dt, bool fused) {
  fused_ops_set_enabled(fused);
  RMSNorm norm(w0.size(0), 1e-5);
  norm->to(at::kCUDA, dt);
  {
    torch::NoGradGuard no_grad;
    norm->weight.copy_(w0);
  }
  at::Tensor x = leaf(x0, dt);
  at::Tensor y = norm->forward(x);
  y.backward(dy0.to(dt));
  return {y.detach(), x.grad(), norm->weight.grad()};
}

}  // namespace

TEST_CASE("fused RMSNorm forward and backward match the torch composite", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(11);
  for (int64_t rows : {1, 37, 1031}) {
    for (int64_t cols : {64, 2048, 2056, 4096, 8192}) {
      INFO("rows " << rows << " cols " << cols);
      const at::Tensor x = (at::randn({rows, cols}, cuda(at::kFloat)) * 3 + 0.5).to(at::kBFloat16);
      const at::Tensor w = (1 + 0.2 * at::randn({cols}, cuda(at::kFloat))).to(at::kBFloat16);
      const at::Tensor dy = at::randn({rows, cols}, cuda(at::kFloat)).to(at::kBFloat16);
      fused_ops_set_enabled(true);
      REQUIRE(fused_rmsnorm(x, w, 1e-5).defined());  // the fused path really runs below
      const NormOut f = run_norm(x, w, dy, at::kBFloat16, true);
      const NormOut c = run_norm(x, w, dy, at::kBFloat16, false);
      const NormOut r = run_norm(x, w, dy, at::kFloat, false);
      CHECK(f.y.scalar_type() == at::kBFloat16);
      CHECK(f.dw.scalar_type() == at::kBFloat16);
      check_2x("y", f.y, c.y, r.y);
      check_2x("dx", f.dx, c.dx, r.dx);
      check_2x("dweight", f.dw, c.dw, r.dw);
    }
  }
  // 3-d input (B, S, H) goes through the same rows.
  const at::Tensor x3 = at::randn({2, 5, 64}, cuda(at::kBFloat16));
  const at::Tensor w3 = at::ones({64}, cuda(at::kBFloat16));
  fused_ops_set_enabled(true);
  const at::Tensor y3 = fused_rmsnorm(x3, w3, 1e-5);
  REQUIRE(y3.defined());
  CHECK(y3.sizes() == x3.sizes());
  // Shapes and dtypes the kernel does not take fall back (undefined: the caller runs the composite).
  CHECK_FALSE(fused_rmsnorm(at::randn({3, 12}, cuda(at::kBFloat16)), at::ones({12}, cuda(at::kBFloat16)), 1e-5).defined());
  CHECK_FALSE(fused_rmsnorm(at::randn({3, 64}, cuda(at::kFloat)), at::ones({64}, cuda(at::kFloat)), 1e-5).defined());
  CHECK_FALSE(fused_rmsnorm(at::randn({3, 64}).to(at::kBFloat16), at::ones({64}).to(at::kBFloat16), 1e-5).defined());
  fused_ops_set_enabled(false);
  CHECK_FALSE(fused_rmsnorm(x3, w3, 1e-5).defined());
}

TEST_CASE("fused residual add + RMSNorm matches x + delta then the norm, forward and backward", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(16);
  for (int64_t rows : {1, 37, 1031}) {
    for (int64_t cols : {64, 2048, 2056, 8192}) {
      INFO("rows " << rows << " cols " << cols);
      const at::Tensor x = (at::randn({rows, cols}, cuda(at::kFloat)) * 3 + 0.5).to(at::kBFloat16);
      const at::Tensor delta = (at::randn({rows, cols}, cuda(at::kFloat)) * 0.7).to(at::kBFloat16);
      const at::Tensor w = (1 + 0.2 * at::randn({cols}, cuda(at::kFloat))).to(at::kBFloat16);
      const at::Tensor dh = at::randn({rows, cols}, cuda(at::kFloat)).to(at::kBFloat16);
      const at::Tensor dy = at::randn({rows, cols}, cuda(at::kFloat)).to(at::kBFloat16);
      struct Out {
        at::Tensor h, y, dx, ddelta, dw;
      };
      // use_h / use_y: which outputs reach the loss (the last layer's h reaches only the final norm).
      auto run = [&](at::ScalarType dt, bool fused, bool use_h, bool use_y) {
        fused_ops_set_enabled(fused);
        RMSNorm norm(cols, 1e-5);
        norm->to(at::kCUDA, dt);
        {
          torch::NoGradGuard no_grad;
          norm->weight.copy_(w);
        }
        at::Tensor xl = leaf(x, dt), dl = leaf(delta, dt), h, y;
        if (fused) {
          std::tie(h, y) = fused_add_rmsnorm(xl, dl, norm->weight, 1e-5);
          REQUIRE(h.defined());
          REQUIRE(y.defined());
        } else {
          h = xl + dl;
          y = norm->forward(h);
        }
        std::vector<at::Tensor> outs, grads;
        if (use_h) outs.push_back(h), grads.push_back(dh.to(dt));
        if (use_y) outs.push_back(y), grads.push_back(dy.to(dt));
        torch::autograd::backward(outs, grads);
        return Out{h.detach(), y.detach(), xl.grad(), dl.grad(), norm->weight.grad()};
      };
      const Out f = run(at::kBFloat16, true, true, true), c = run(at::kBFloat16, false, true, true),
                r = run(at::kFloat, false, true, true);
      // h is torch's bf16 add bit for bit, and y the plain fused norm of it bit for bit (activation
      // checkpointing recomputes a layer's normed input with the plain norm).
      CHECK(at::equal(f.h, c.h));
      fused_ops_set_enabled(true);
      CHECK(at::equal(f.y, fused_rmsnorm(c.h, w, 1e-5)));
      check_2x("y", f.y, c.y, r.y);
      check_2x("dx", f.dx, c.dx, r.dx);
      CHECK(at::equal(f.dx, f.ddelta));
      check_2x("ddelta", f.ddelta, c.ddelta, r.ddelta);
      check_2x("dweight", f.dw, c.dw, r.dw);
      // Only y reaches the loss: the plain fused norm's backward of h, bit for bit.
      const Out fy = run(at::kBFloat16, true, false, true);
      {
        fused_ops_set_enabled(true);
        RMSNorm norm(cols, 1e-5);
        norm->to(at::kCUDA, at::kBFloat16);
        {
          torch::NoGradGuard no_grad;
          norm->weight.copy_(w);
        }
        at::Tensor hl = leaf(c.h, at::kBFloat16);
        norm->forward(hl).backward(dy);
        CHECK(at::equal(fy.dx, hl.grad()));
        CHECK(at::equal(fy.ddelta, hl.grad()));
        CHECK(at::equal(fy.dw, norm->weight.grad()));
      }
      // Only h reaches the loss: both inputs get dh, the weight nothing.
      const Out fh = run(at::kBFloat16, true, true, false);
      CHECK(at::equal(fh.dx, dh));
      CHECK(at::equal(fh.ddelta, dh));
      CHECK((!fh.dw.defined() || fh.dw.abs().max().item<float>() == 0.f));
    }
  }
  // Inputs the kernel does not take fall back (undefined: the caller adds and norms itself).
  fused_ops_set_enabled(true);
  const at::Tensor a = at::randn({3, 64}, cuda(at::kBFloat16)), w = at::ones({64}, cuda(at::kBFloat16));
  CHECK(fused_add_rmsnorm(a, a, w, 1e-5).first.defined());
  CHECK_FALSE(fused_add_rmsnorm(a, at::randn({2, 64}, cuda(at::kBFloat16)), w, 1e-5).first.defined());
  CHECK_FALSE(fused_add_rmsnorm(a.to(at::kFloat), a.to(at::kFloat), w.to(at::kFloat), 1e-5).first.defined());
  CHECK_FALSE(fused_add_rmsnorm(a.cpu(), a.cpu(), w.cpu(), 1e-5).first.defined());
  fused_ops_set_enabled(false);
  CHECK_FALSE(fused_add_rmsnorm(a, a, w, 1e-5).first.defined());
}

TEST_CASE("fused RoPE of q and k matches rope_apply, forward and backward", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(12);
  LlamaArch arch;  // Llama 3 scaling on, as in the real models
  for (int64_t head_dim : {64, 128, 16}) {
    arch.head_dim = head_dim;
    const int64_t T = 37, hq = 8, hk = 2;
    INFO("head_dim " << head_dim);
    const at::Tensor positions = at::randint(0, 8192, {T}, cuda(at::kLong));
    const RopeCosSin cs = rope_cos_sin(rope_inv_freq(arch), positions);
    const at::Tensor q = at::randn({T, hq, head_dim}, cuda(at::kBFloat16));
    const at::Tensor k = at::randn({T, hk, head_dim}, cuda(at::kBFloat16));
    const at::Tensor gq = at::randn({T, hq, head_dim}, cuda(at::kBFloat16));
    const at::Tensor gk = at::randn({T, hk, head_dim}, cuda(at::kBFloat16));
    struct Out {
      at::Tensor q, k, dq, dk;
    };
    auto run = [&](at::ScalarType dt, bool fused) {
      at::Tensor ql = leaf(q, dt), kl = leaf(k, dt);
      at::Tensor qo, ko;
      if (fused) {
        fused_ops_set_enabled(true);
        auto qk = fused_rope(ql, kl, cs);
        REQUIRE(qk.first.defined());
        qo = qk.first;
        ko = qk.second;
      } else {
        qo = rope_apply(ql, cs);
        ko = rope_apply(kl, cs);
      }
      torch::autograd::backward({qo, ko}, {gq.to(dt), gk.to(dt)});
      return Out{qo.detach(), ko.detach(), ql.grad(), kl.grad()};
    };
    const Out f = run(at::kBFloat16, true), c = run(at::kBFloat16, false), r = run(at::kFloat, false);
    check_2x("q", f.q, c.q, r.q);
    check_2x("k", f.k, c.k, r.k);
    check_2x("dq", f.dq, c.dq, r.dq);
    check_2x("dk", f.dk, c.dk, r.dk);
    // Only q reaches the loss: k's gradient is zero, q's the same as before.
    at::Tensor ql = leaf(q, at::kBFloat16), kl = leaf(k, at::kBFloat16);
    auto qk = fused_rope(ql, kl, cs);
    qk.first.backward(gq);
    CHECK(max_err(ql.grad(), f.dq) == 0.0);
    CHECK((!kl.grad().defined() || kl.grad().abs().max().item<float>() == 0.f));
  }
  // head_dim not a multiple of 16 falls back.
  arch.head_dim = 8;
  const at::Tensor pos = at::arange(4, cuda(at::kLong));
  const RopeCosSin cs8 = rope_cos_sin(rope_inv_freq(arch), pos);
  fused_ops_set_enabled(true);
  CHECK_FALSE(fused_rope(at::randn({4, 2, 8}, cuda(at::kBFloat16)), at::randn({4, 1, 8}, cuda(at::kBFloat16)), cs8).first.defined());
}

TEST_CASE("fused SwiGLU matches silu(gate) * up, forward and backward", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(13);
  for (int64_t cols : {688, 131}) {  // vectorised (multiple of 8) and scalar paths
    const int64_t rows = 37;
    INFO("cols " << cols);
    const at::Tensor gate = (at::randn({rows, cols}, cuda(at::kFloat)) * 4).to(at::kBFloat16);
    const at::Tensor up = at::randn({rows, cols}, cuda(at::kBFloat16));
    const at::Tensor dout = at::randn({rows, cols}, cuda(at::kBFloat16));
    struct Out {
      at::Tensor out, dgate, dup;
    };
    auto run = [&](at::ScalarType dt, bool fused) {
      at::Tensor g = leaf(gate, dt), u = leaf(up, dt);
      fused_ops_set_enabled(true);
      at::Tensor o = fused ? fused_swiglu(g, u) : at::silu(g) * u;
      REQUIRE(o.defined());
      o.backward(dout.to(dt));
      return Out{o.detach(), g.grad(), u.grad()};
    };
    const Out f = run(at::kBFloat16, true), c = run(at::kBFloat16, false), r = run(at::kFloat, false);
    check_2x("out", f.out, c.out, r.out);
    check_2x("dgate", f.dgate, c.dgate, r.dgate);
    check_2x("dup", f.dup, c.dup, r.dup);
  }
  fused_ops_set_enabled(true);
  CHECK_FALSE(fused_swiglu(at::randn({2, 8}, cuda(at::kFloat)), at::randn({2, 8}, cuda(at::kFloat))).defined());
}

TEST_CASE("packed q|k|v + RoPE and gate|up + SwiGLU on one weight buffer match the separate ops", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(17);
  struct Case {
    int64_t tokens, hidden, heads_q, heads_kv, head_dim, inner;
  };
  // inner 100: the SwiGLU rows' scalar path (not a multiple of 8).
  for (const Case cs : {Case{37, 256, 8, 2, 64, 688}, Case{1031, 128, 4, 2, 16, 100}, Case{64, 256, 2, 1, 128, 512}}) {
    INFO("tokens " << cs.tokens << " hidden " << cs.hidden << " head_dim " << cs.head_dim << " inner " << cs.inner);
    const int64_t H = cs.hidden, nq = cs.heads_q * cs.head_dim, nkv = cs.heads_kv * cs.head_dim, I = cs.inner;
    // One buffer, as FlatAdamW's bf16 model copy lays the weights out: q, k, v, then gate, up.
    const at::Tensor buf = (at::randn({(nq + 2 * nkv + 2 * I) * H}, cuda(at::kFloat)) * 0.08).to(at::kBFloat16);
    const at::Tensor x = at::randn({cs.tokens, H}, cuda(at::kBFloat16));
    LlamaArch arch;
    arch.head_dim = cs.head_dim;
    const RopeCosSin rope = rope_cos_sin(rope_inv_freq(arch), at::randint(0, 8192, {cs.tokens}, cuda(at::kLong)));
    const at::Tensor gq = at::randn({cs.tokens, cs.heads_q, cs.head_dim}, cuda(at::kBFloat16));
    const at::Tensor gk = at::randn({cs.tokens, cs.heads_kv, cs.head_dim}, cuda(at::kBFloat16));
    const at::Tensor gv = at::randn({cs.tokens, cs.heads_kv, cs.head_dim}, cuda(at::kBFloat16));
    const at::Tensor gh = at::randn({cs.tokens, I}, cuda(at::kBFloat16));
    // Leaves over the buffer (packed = true: views of one storage, as the optimizer binds them) or
    // copies in their own storage (the separate ops' path).
    struct Weights {
      at::Tensor q, k, v, g, u;
    };
    // flat_grads: each .grad a view of one zeroed bf16 buffer in the same layout (FlatAdamW's
    // gradient buffer): the backward then adds dW into it in place (fused_linear's rule).
    auto weights = [&](at::ScalarType dt, bool packed, bool flat_grads = false) {
      int64_t off = 0;
      const at::Tensor gbuf = at::zeros_like(buf);
      auto take = [&](int64_t rows) {
        at::Tensor w = buf.narrow(0, off, rows * H).view({rows, H});
        at::Tensor out = (packed && dt == at::kBFloat16 ? w.detach() : w.to(dt).clone()).requires_grad_(true);
        if (flat_grads) out.mutable_grad() = gbuf.narrow(0, off, rows * H).view({rows, H});
        off += rows * H;
        return out;
      };
      Weights w;
      w.q = take(nq), w.k = take(nkv), w.v = take(nkv), w.g = take(I), w.u = take(I);
      return w;
    };
    struct Out {
      at::Tensor q, k, v, h, dx, dwq, dwk, dwv, dwg, dwu;
    };
    auto run = [&](at::ScalarType dt, bool fused, bool flat_grads = false) {
      fused_ops_set_enabled(fused);
      Weights w = weights(dt, fused, flat_grads);
      const std::vector<void*> grad_ptrs = {w.q.grad().defined() ? w.q.grad().data_ptr() : nullptr,
                                            w.u.grad().defined() ? w.u.grad().data_ptr() : nullptr};
      at::Tensor xl = leaf(x, dt), q, k, v, h;
      if (fused) {
        std::vector<at::Tensor> qkv =
            fused_qkv_rope(xl, w.q, w.k, w.v, rope, cs.heads_q, cs.heads_kv, cs.head_dim);
        REQUIRE(qkv.size() == 3);
        q = qkv[0], k = qkv[1], v = qkv[2];
        h = fused_gate_up_swiglu(xl, w.g, w.u);
        REQUIRE(h.defined());
      } else {
        q = rope_apply(at::mm(xl, w.q.t()).view({cs.tokens, cs.heads_q, cs.head_dim}), rope);
        k = rope_apply(at::mm(xl, w.k.t()).view({cs.tokens, cs.heads_kv, cs.head_dim}), rope);
        v = at::mm(xl, w.v.t()).view({cs.tokens, cs.heads_kv, cs.head_dim});
        h = at::silu(at::mm(xl, w.g.t())) * at::mm(xl, w.u.t());
      }
      torch::autograd::backward({q, k, v, h}, {gq.to(dt), gk.to(dt), gv.to(dt), gh.to(dt)});
      if (flat_grads) {  // added in place: still the buffer's views
        CHECK(w.q.grad().data_ptr() == grad_ptrs[0]);
        CHECK(w.u.grad().data_ptr() == grad_ptrs[1]);
      }
      return Out{q.detach(), k.detach(), v.detach(), h.detach(), xl.grad(), w.q.grad(),
                 w.k.grad(), w.v.grad(), w.g.grad(), w.u.grad()};
    };
    const Out f = run(at::kBFloat16, true), c = run(at::kBFloat16, false), r = run(at::kFloat, false);
    const Out fg = run(at::kBFloat16, true, true);
    // With the gradients in one flat buffer the GEMMs add dW into it: the same values.
    check_2x("in place dx", fg.dx, c.dx, r.dx);
    check_2x("in place dwq", fg.dwq, c.dwq, r.dwq);
    check_2x("in place dwk", fg.dwk, c.dwk, r.dwk);
    check_2x("in place dwv", fg.dwv, c.dwv, r.dwv);
    check_2x("in place dwgate", fg.dwg, c.dwg, r.dwg);
    check_2x("in place dwup", fg.dwu, c.dwu, r.dwu);
    CHECK(f.q.is_contiguous());
    CHECK(f.v.is_contiguous());
    check_2x("q", f.q, c.q, r.q);
    check_2x("k", f.k, c.k, r.k);
    check_2x("v", f.v, c.v, r.v);
    check_2x("h", f.h, c.h, r.h);
    check_2x("dx", f.dx, c.dx, r.dx);
    check_2x("dwq", f.dwq, c.dwq, r.dwq);
    check_2x("dwk", f.dwk, c.dwk, r.dwk);
    check_2x("dwv", f.dwv, c.dwv, r.dwv);
    check_2x("dwgate", f.dwg, c.dwg, r.dwg);
    check_2x("dwup", f.dwu, c.dwu, r.dwu);
    // Weights in separate storages, or out of order, are not one matrix: no packed op.
    fused_ops_set_enabled(true);
    const Weights own = weights(at::kBFloat16, false), flat = weights(at::kBFloat16, true);
    CHECK(fused_qkv_rope(x, own.q, own.k, own.v, rope, cs.heads_q, cs.heads_kv, cs.head_dim).empty());
    CHECK(fused_qkv_rope(x, flat.q, flat.v, flat.k, rope, cs.heads_q, cs.heads_kv, cs.head_dim).empty());
    CHECK_FALSE(fused_gate_up_swiglu(x, own.g, own.u).defined());
    CHECK_FALSE(fused_gate_up_swiglu(x, flat.u, flat.g).defined());
    fused_ops_set_enabled(false);
    CHECK(fused_qkv_rope(x, flat.q, flat.k, flat.v, rope, cs.heads_q, cs.heads_kv, cs.head_dim).empty());
    CHECK_FALSE(fused_gate_up_swiglu(x, flat.g, flat.u).defined());
  }
}

TEST_CASE("fused linear adds dW into a bf16 .grad in place, as autograd's accumulation would", "[gpu][fused]") {
  FusedSwitch restore;
  at::manual_seed(18);
  const at::Tensor x = at::randn({1031, 256}, cuda(at::kBFloat16));
  const at::Tensor w = (at::randn({96, 256}, cuda(at::kFloat)) * 0.1).to(at::kBFloat16);
  const at::Tensor g0 = (at::randn({96, 256}, cuda(at::kFloat)) * 10).to(at::kBFloat16);  // earlier gradient
  const at::Tensor dy = at::randn({1031, 96}, cuda(at::kBFloat16));
  struct Out {
    at::Tensor y, dx, dw;
  };
  auto run = [&](at::ScalarType dt, bool fused) {
    fused_ops_set_enabled(fused);
    at::Tensor xl = leaf(x, dt), wl = leaf(w, dt);
    wl.mutable_grad() = g0.to(dt).clone();
    void* before = wl.grad().data_ptr();
    at::Tensor y = fused ? fused_linear(xl, wl) : at::mm(xl, wl.t());
    REQUIRE(y.defined());
    y.backward(dy.to(dt));
    if (fused) CHECK(wl.grad().data_ptr() == before);
    return Out{y.detach(), xl.grad(), wl.grad()};
  };
  const Out f = run(at::kBFloat16, true), c = run(at::kBFloat16, false), r = run(at::kFloat, false);
  CHECK(at::equal(f.y, c.y));
  check_2x("dx", f.dx, c.dx, r.dx);
  check_2x("grad", f.dw, c.dw, r.dw);
  // No .grad to add into (a model without the optimizer): torch's linear instead.
  fused_ops_set_enabled(true);
  CHECK_FALSE(fused_linear(x, leaf(w, at::kBFloat16)).defined());
}

TEST_CASE("fused cross-entropy matches the chunked composite: loss, dhidden, dweight", "[gpu][fused][loss]") {
  FusedSwitch restore;
  at::manual_seed(14);
  struct Case {
    int64_t T, V, H, chunk;
  };
  // Vocab sizes: a multiple of 8 but not of the kernel's 2048 elements per pass, an odd one (scalar
  // path), and the real 128256. Chunks: one, several with a ragged last one, and the default.
  for (const Case cs : {Case{37, 1000, 64, 0}, Case{37, 1000, 64, 7}, Case{1031, 1003, 128, 100},
                        Case{64, 128256, 64, 0}, Case{64, 128256, 64, 24}}) {
    INFO("T " << cs.T << " V " << cs.V << " H " << cs.H << " chunk " << cs.chunk);
    const at::Tensor hidden = at::randn({cs.T, cs.H}, cuda(at::kBFloat16));
    const at::Tensor weight = (at::randn({cs.V, cs.H}, cuda(at::kFloat)) * 0.3).to(at::kBFloat16);
    at::Tensor labels = at::randint(0, cs.V, {cs.T}, cuda(at::kLong));
    labels.index_fill_(0, at::arange(0, cs.T, 5, cuda(at::kLong)), -100);  // every 5th row ignored
    labels[cs.T - 1] = cs.V - 1;                                            // the last vocab entry
    if (cs.chunk > 0 && cs.T >= 2 * cs.chunk) labels.narrow(0, cs.chunk, cs.chunk).fill_(-100);  // a whole chunk
    struct Out {
      double loss;
      int64_t count;
      at::Tensor dh, dw;
    };
    auto run = [&](at::ScalarType dt, bool fused) {
      fused_ops_set_enabled(fused);
      at::Tensor h = leaf(hidden, dt), w = leaf(weight, dt);
      LossOptions o;
      o.chunk_tokens = cs.chunk;
      LossResult r = chunked_cross_entropy(h, w, labels, o);
      CHECK(r.sum.scalar_type() == at::kFloat);
      (r.sum * 0.37).backward();
      return Out{r.sum.item<double>(), r.count, h.grad(), w.grad()};
    };
    fused_ops_set_enabled(true);
    REQUIRE(fused_cross_entropy_sum(hidden, weight, labels, cs.chunk, -100).defined());
    const Out f = run(at::kBFloat16, true), c = run(at::kBFloat16, false), r = run(at::kFloat, false);
    CHECK(f.count == r.count);
    {
      const double ef = std::abs(f.loss - r.loss), ec = std::abs(c.loss - r.loss);
      INFO("loss fused " << f.loss << " bf16 composite " << c.loss << " fp32 " << r.loss);
      CHECK(ef <= 2 * ec + 1e-5 * std::abs(r.loss));
    }
    CHECK(f.dh.scalar_type() == at::kBFloat16);
    CHECK(f.dw.scalar_type() == at::kBFloat16);
    check_2x("dhidden", f.dh, c.dh, r.dh);
    check_2x("dweight", f.dw, c.dw, r.dw);
    // Ignored rows get exactly zero gradient.
    const at::Tensor ignored = labels.eq(-100);
    CHECK(f.dh.masked_select(ignored.unsqueeze(1)).abs().max().item<float>() == 0.f);

    // Only the weight wants a gradient, or nothing does (no graph): same loss, no error.
    fused_ops_set_enabled(true);
    at::Tensor w_only = leaf(weight, at::kBFloat16);
    LossOptions o;
    o.chunk_tokens = cs.chunk;
    LossResult rw = chunked_cross_entropy(hidden, w_only, labels, o);
    CHECK(rw.sum.item<double>() == f.loss);
    (rw.sum * 0.37).backward();
    CHECK(max_err(w_only.grad(), f.dw) == 0.0);
    // A bf16 .grad already there (the optimizer's flat view) gets dW added in place: from zeros, the
    // same bits.
    at::Tensor w_acc = leaf(weight, at::kBFloat16);
    w_acc.mutable_grad() = at::zeros_like(weight);
    void* w_acc_grad = w_acc.grad().data_ptr();
    LossResult racc = chunked_cross_entropy(hidden, w_acc, labels, o);
    (racc.sum * 0.37).backward();
    CHECK(w_acc.grad().data_ptr() == w_acc_grad);
    CHECK(max_err(w_acc.grad(), f.dw) == 0.0);
    {
      torch::NoGradGuard no_grad;
      LossResult rn = chunked_cross_entropy(hidden, weight, labels, o);
      CHECK(rn.sum.item<double>() == f.loss);
    }
  }
}

namespace {

struct ModelRun {
  double loss = 0;
  std::map<std::string, at::Tensor> grads;
};

// One forward + backward of the mean token loss on a fixed batch, the reference attention kernel
// (deterministic, any device).
// keep_grads: zero the existing .grad tensors in place (as FlatAdamW leaves its flat views) instead of
// module zero_grad (which may drop them).
ModelRun run_model(LlamaModel& m, const at::Tensor& ids, const at::Tensor& labels, int64_t B, int64_t S,
                   bool keep_grads = false) {
  if (keep_grads) {
    torch::NoGradGuard no_grad;
    for (auto& p : m->parameters()) {
      REQUIRE(p.grad().defined());
      p.mutable_grad().zero_();
    }
  } else {
    m->zero_grad();
  }
  at::Tensor positions = at::arange(S, cuda(at::kLong)).repeat({B});
  at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), positions, spec_causal_batch(B, S));
  LossResult r = llama_loss(*m, hidden, labels.reshape({-1}));
  at::Tensor loss = r.sum / static_cast<double>(r.count);
  loss.backward();
  ModelRun out;
  out.loss = loss.item<double>();
  for (const auto& p : m->named_parameters()) {
    REQUIRE(p.value().grad().defined());
    out.grads[p.key()] = p.value().grad().to(at::kFloat).clone();
  }
  return out;
}

void compare_models(const LlamaArch& arch, const std::string& weights_dir) {
  FusedSwitch restore;
  at::manual_seed(15);
  LlamaModel m32(arch);
  if (!weights_dir.empty()) hf_load_weights(*m32, weights_dir);
  m32->set_attention_backend(make_attention_backend("reference"));
  m32->to(at::kCUDA);
  LlamaModel m16(arch);
  m16->set_attention_backend(make_attention_backend("reference"));
  {
    torch::NoGradGuard no_grad;
    auto src = m32->named_parameters();
    for (auto& p : m16->named_parameters()) p.value().copy_(src[p.key()].cpu());
  }
  m16->to(at::kCUDA, at::kBFloat16);
  REQUIRE(fused_rmsnorm(at::zeros({1, arch.hidden_size}, cuda(at::kBFloat16)),
                        at::ones({arch.hidden_size}, cuda(at::kBFloat16)), 1e-5)
              .defined());

  const int64_t B = 2, S = 48;
  const at::Tensor ids = at::randint(0, arch.vocab_size, {B, S}, cuda(at::kLong));
  at::Tensor labels = at::full({B, S}, -100, cuda(at::kLong));
  labels.narrow(1, 0, S - 1).copy_(ids.narrow(1, 1, S - 1));

  fused_ops_set_enabled(false);
  const ModelRun ref = run_model(m32, ids, labels, B, S);
  const ModelRun composite = run_model(m16, ids, labels, B, S);
  fused_ops_set_enabled(true);
  const ModelRun fused = run_model(m16, ids, labels, B, S);
  m16->set_activation_checkpointing(true);
  const ModelRun fused_ckpt = run_model(m16, ids, labels, B, S);
  // The trainer's layout: FlatAdamW makes the parameters views of one bf16 buffer, so q|k|v and
  // gate|up are one matrix each and the packed projections run.
  m16->set_activation_checkpointing(false);
  FlatAdamW flat(m16->named_parameters().pairs(), AdamWHyper{});
  {
    auto& mlp = *m16->model->layers->at<LlamaDecoderLayerImpl>(0).mlp;
    REQUIRE(fused_gate_up_swiglu(at::zeros({1, arch.hidden_size}, cuda(at::kBFloat16)), mlp.gate_proj->weight,
                                 mlp.up_proj->weight)
                .defined());
  }
  // The flat gradient views stay bound, so the weight gradients are added in place (fused_linear).
  const ModelRun packed = run_model(m16, ids, labels, B, S, /*keep_grads=*/true);
  m16->set_activation_checkpointing(true);
  const ModelRun packed_ckpt = run_model(m16, ids, labels, B, S, /*keep_grads=*/true);

  {
    const double ef = std::abs(fused.loss - ref.loss), ec = std::abs(composite.loss - ref.loss);
    INFO("loss fused " << fused.loss << " bf16 composite " << composite.loss << " fp32 " << ref.loss);
    CHECK(ef <= 2 * ec + 2e-3);
    CHECK(fused_ckpt.loss == fused.loss);
    const double ep = std::abs(packed.loss - ref.loss);
    INFO("loss packed " << packed.loss);
    CHECK(ep <= 2 * ec + 2e-3);
    CHECK(packed_ckpt.loss == packed.loss);
  }
  for (const auto& kv : ref.grads) {
    const std::string& name = kv.first;
    INFO(name);
    const at::Tensor& g32 = kv.second;
    const at::Tensor &gf = fused.grads.at(name), &gc = composite.grads.at(name);
    // Whole-tensor norms: a bf16 network's gradients carry noise of a few percent per element.
    const double nr = g32.norm().item<double>();
    const double ef = (gf - g32).norm().item<double>(), ec = (gc - g32).norm().item<double>();
    INFO("|g| " << nr << " fused err " << ef << " bf16 composite err " << ec);
    CHECK(ef <= 2 * ec + 5e-3 * nr);
    const double cosine = (gf * g32).sum().item<double>() / (gf.norm().item<double>() * nr + 1e-30);
    CHECK(cosine > 0.99);
    // Checkpointing recomputes with the same kernels: the same gradients, up to the order of
    // CUDA reductions outside these ops (a couple of bf16 ulps at most).
    CHECK(max_err(fused_ckpt.grads.at(name), gf) <= 8e-3 * gf.abs().max().item<double>());
    const at::Tensor& gp = packed.grads.at(name);
    const double ep = (gp - g32).norm().item<double>();
    INFO("packed err " << ep);
    CHECK(ep <= 2 * ec + 5e-3 * nr);
    CHECK(max_err(packed_ckpt.grads.at(name), gp) <= 8e-3 * gp.abs().max().item<double>());
  }
}

}  // namespace

TEST_CASE("tiny Llama: fused ops give the composite's loss and gradients (head_dim 64, tied)", "[gpu][fused][llama]") {
  LlamaArch a;
  a.vocab_size = 1003;  // odd: the cross-entropy kernel's scalar path
  a.hidden_size = 256;
  a.intermediate_size = 688;
  a.num_layers = 2;
  a.num_heads = 4;
  a.num_kv_heads = 2;
  a.head_dim = 64;
  a.tie_embeddings = true;
  compare_models(a, "");
}

TEST_CASE("HF fixture Llama (untied, head_dim 16): fused vs composite", "[gpu][fused][llama]") {
  const std::string dir = std::string(FLEXCP_SOURCE_DIR) + "/test/fixtures/llama/untied";
  compare_models(hf_config_read(dir), dir);
}
