// The fused ops (core/fused_ops.h) over our CUDA kernels (cuda/train_kernels.h), as autograd
// functions. Built only with CUDA LibTorch; fused_ops.cpp has the CPU-build stubs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <spdlog/spdlog.h>
#include <torch/autograd.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include "core/fused_ops.h"
#include "cuda/train_kernels.h"

namespace flexcp {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("FLEXCP_FUSED_OPS");
    return v == nullptr || std::string(v) != "0";
  }()};
  return on;
}

bool bf16_cuda(const at::Tensor& t) { return t.defined() && t.is_cuda() && t.scalar_type() == at::kBFloat16; }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// The kernels want dense rows and 16-byte aligned base pointers: a contiguous view with an odd
// storage offset is copied.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor bf16_grad(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? dense(g.to(at::kBFloat16)) : at::zeros_like(like);
}

// ------------------------------------------------------------------------------------------------
// RMSNorm

struct RMSNormFn : public torch::autograd::Function<RMSNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
    c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = dense(x_in), w = dense(w_in);
    const int64_t cols = x.size(-1), rows = x.numel() / cols;
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    fused::rmsnorm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, cols,
                           static_cast<float>(eps), stream());
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor dy = bf16_grad(grad_out[0], x);
    const int64_t cols = x.size(-1), rows = x.numel() / cols;
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor dw = at::empty({cols}, x.options().dtype(at::kFloat));
    at::Tensor ws = at::empty({std::max<int64_t>(1, fused::rmsnorm_backward_workspace_floats(rows, cols))},
                              x.options().dtype(at::kFloat));
    fused::rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                            dw.data_ptr<float>(), ws.data_ptr<float>(), rows, cols, stream());
    return {dx, dw.to(w.scalar_type()), at::Tensor()};
  }
};

// ------------------------------------------------------------------------------------------------
// Rotary embeddings (q and k together)

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& cos, const at::Tensor& sin) {
    c10::cuda::CUDAGuard guard(q_in.device());
    const at::Tensor q = dense(q_in), k = dense(k_in);
    at::Tensor qo = at::empty_like(q, at::MemoryFormat::Contiguous), ko = at::empty_like(k, at::MemoryFormat::Contiguous);
    fused::rope_apply(q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), cos.data_ptr<float>(),
                      sin.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2), /*inverse=*/false, stream());
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads_q"] = q.size(1);
    ctx->saved_data["heads_k"] = k.size(1);
    return {qo, ko};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &cos = saved[0], &sin = saved[1];
    c10::cuda::CUDAGuard guard(cos.device());
    const int64_t tokens = cos.size(0), head_dim = cos.size(1);
    const int64_t heads_q = ctx->saved_data["heads_q"].toInt(), heads_k = ctx->saved_data["heads_k"].toInt();
    // An output that did not reach the loss has no gradient: it counts as zeros.
    const auto grad_or_zeros = [&](const at::Tensor& g, int64_t heads) {
      return g.defined() ? dense(g.to(at::kBFloat16))
                         : at::zeros({tokens, heads, head_dim}, cos.options().dtype(at::kBFloat16));
    };
    const at::Tensor gq = grad_or_zeros(grad_out[0], heads_q), gk = grad_or_zeros(grad_out[1], heads_k);
    at::Tensor dq = at::empty_like(gq, at::MemoryFormat::Contiguous), dk = at::empty_like(gk, at::MemoryFormat::Contiguous);
    fused::rope_apply(gq.data_ptr(), gk.data_ptr(), dq.data_ptr(), dk.data_ptr(), cos.data_ptr<float>(),
                      sin.data_ptr<float>(), tokens, heads_q, heads_k, head_dim, /*inverse=*/true, stream());
    return {dq, dk, at::Tensor(), at::Tensor()};
  }
};

// ------------------------------------------------------------------------------------------------
// SwiGLU

struct SwiGLUFn : public torch::autograd::Function<SwiGLUFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate_in, const at::Tensor& up_in) {
    c10::cuda::CUDAGuard guard(gate_in.device());
    const at::Tensor gate = dense(gate_in), up = dense(up_in);
    at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
    fused::swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), stream());
    ctx->save_for_backward({gate, up});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    c10::cuda::CUDAGuard guard(gate.device());
    const at::Tensor dout = bf16_grad(grad_out[0], gate);
    at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
    at::Tensor dup = at::empty_like(up, at::MemoryFormat::Contiguous);
    fused::swiglu_backward(dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                           gate.numel(), stream());
    return {dgate, dup};
  }
};

// ------------------------------------------------------------------------------------------------
// Cross-entropy
//
// Per chunk of tokens: logits = h @ W^T in bf16 (cuBLAS), one kernel turns each row into its loss
// and, when gradients are wanted, overwrites the logits with d loss / d logits = softmax - onehot;
// then the two gradient GEMMs run at once: dh_chunk = dlogits @ W and dW += dlogits^T @ h_chunk.
// The backward only scales the saved dh and dW by the incoming gradient. Compared with recomputing
// in the backward (the torch composite), this saves one (chunk, V, H) GEMM per chunk and all fp32
// passes over the logits, and costs memory held from the loss forward to its backward: dh (T, H)
// in bf16 and dW (V, H) in fp32 (about 1 GiB for Llama-3.2-1B's 128256 x 2048; the composite's
// backward allocates the same fp32 buffer).

// dW is accumulated in fp32 over the chunks. Where LibTorch has addmm with out_dtype (bf16 inputs,
// fp32 output and fp32 self), one GEMM adds into dW; otherwise the chunk's bf16 GEMM result is added
// to dW in a separate pass (about 2.5 GB of memory traffic per chunk at the 1B shapes).
template <typename T, typename = void>
struct HasAddmmOutDtype : std::false_type {};
template <typename T>
struct HasAddmmOutDtype<T, std::void_t<decltype(at::addmm_out(std::declval<T&>(), std::declval<const T&>(),
                                                              std::declval<const T&>(), std::declval<const T&>(),
                                                              at::ScalarType::Float, at::Scalar(1), at::Scalar(1)))>>
    : std::true_type {};

// acc = beta * acc + a @ b; beta 0 ignores acc's old content.
template <typename T>
bool addmm_fp32_accumulate(T& acc, const T& a, const T& b, double beta) {
  if constexpr (HasAddmmOutDtype<T>::value) {
    at::addmm_out(acc, acc, a, b, at::ScalarType::Float, at::Scalar(beta), at::Scalar(1));
    return true;
  } else {
    return false;
  }
}

// Whether the one-GEMM accumulation works here: checked once on a tiny problem, since LibTorch
// versions differ in whether addmm's self may be fp32 when the inputs are bf16.
bool fp32_gemm_accumulation_works(const at::Device& device) {
  static const bool works = [&] {
    bool ok = false;
    try {
      at::Tensor acc = at::ones({2, 3}, at::TensorOptions().device(device).dtype(at::kFloat));
      const at::Tensor a = at::ones({2, 4}, acc.options().dtype(at::kBFloat16));
      const at::Tensor b = at::ones({4, 3}, acc.options().dtype(at::kBFloat16));
      ok = addmm_fp32_accumulate(acc, a, b, 1.0) && acc.eq(5.f).all().item<bool>();
    } catch (const c10::Error&) {
      ok = false;
    }
    spdlog::info("fused cross-entropy: dW accumulated in fp32 by {}", ok ? "fp32-output GEMM" : "bf16 GEMM + fp32 add");
    return ok;
  }();
  return works;
}

// MiB of bf16 logits per chunk when the caller does not choose: larger chunks mean fewer passes of
// the fp32 dW accumulation (1 GiB read and written per chunk at the 1B shapes) and shorter-K GEMMs
// avoided, at the price of the chunk's logits buffer. FLEXCP_CE_CHUNK_MIB overrides it (A/B timings).
int64_t ce_chunk_mib() {
  static const int64_t mib = [] {
    const char* env = std::getenv("FLEXCP_CE_CHUNK_MIB");
    const int64_t v = env != nullptr ? std::atoll(env) : 0;
    return v > 0 ? v : int64_t(256);
  }();
  return mib;
}

struct CeChunks {
  at::Tensor loss;     // scalar fp32
  at::Tensor dhidden;  // (T, H) bf16, when asked for
  at::Tensor dweight;  // (V, H) fp32, when asked for
};

CeChunks cross_entropy_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              int64_t chunk, int64_t ignore_index, bool need_dh, bool need_dw) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor h = dense(hidden), w = dense(weight), lab = labels.contiguous();
  const int64_t T = h.size(0), V = w.size(0);
  at::Tensor row_loss = at::empty({T}, h.options().dtype(at::kFloat));
  CeChunks r;
  if (need_dh) r.dhidden = at::empty_like(h, at::MemoryFormat::Contiguous);
  const bool one_gemm = need_dw && fp32_gemm_accumulation_works(h.device());
  at::Tensor dw_chunk;  // bf16 (V, H), the two-pass accumulation's GEMM output
  if (need_dw) {
    r.dweight = at::empty(w.sizes(), w.options().dtype(at::kFloat));  // the first chunk overwrites it
    if (!one_gemm) dw_chunk = at::empty(w.sizes(), w.options());
  }
  for (int64_t s = 0; s < T; s += chunk) {
    const int64_t n = std::min(chunk, T - s);
    const at::Tensor hc = h.narrow(0, s, n);
    at::Tensor logits = at::mm(hc, w.t());  // (n, V) bf16, becomes dlogits in place
    fused::cross_entropy_rows(logits.data_ptr(), lab.data_ptr<int64_t>() + s, ignore_index,
                              row_loss.data_ptr<float>() + s, n, V, need_dh || need_dw, stream());
    if (need_dh) {
      at::Tensor dh = r.dhidden.narrow(0, s, n);
      at::mm_out(dh, logits, w);
    }
    if (need_dw) {
      if (one_gemm) {
        addmm_fp32_accumulate(r.dweight, logits.t(), hc, s == 0 ? 0.0 : 1.0);
      } else {
        at::mm_out(dw_chunk, logits.t(), hc);
        if (s == 0)
          r.dweight.copy_(dw_chunk);
        else
          r.dweight.add_(dw_chunk);
      }
    }
  }
  r.loss = row_loss.sum();
  return r;
}

struct CrossEntropyFn : public torch::autograd::Function<CrossEntropyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk, int64_t ignore_index, bool need_dh, bool need_dw) {
    CeChunks r = cross_entropy_chunks(hidden, weight, labels, chunk, ignore_index, need_dh, need_dw);
    ctx->save_for_backward({r.dhidden, r.dweight});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return r.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &dh = saved[0], &dw = saved[1];
    const at::Tensor g = grad_out[0].to(at::kFloat);
    at::Tensor dhidden, dweight;
    if (dh.defined()) dhidden = at::mul(dh, g);  // bf16 result, product in fp32
    if (dw.defined()) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
      dweight = at::empty(dw.sizes(), dw.options().dtype(dtype));
      at::mul_out(dweight, dw, g);  // one pass: fp32 product, stored in the weight's dtype
    }
    return {dhidden, dweight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool fused_ops_enabled() { return enabled_flag().load(); }
void fused_ops_set_enabled(bool on) { enabled_flag().store(on); }

at::Tensor fused_rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!fused_ops_enabled() || !bf16_cuda(x) || !bf16_cuda(weight) || x.dim() < 1 || weight.dim() != 1 ||
      x.device() != weight.device() || weight.size(0) != x.size(-1) || !fused::rmsnorm_supported(x.size(-1)))
    return {};
  return RMSNormFn::apply(x, weight, eps);
}

std::pair<at::Tensor, at::Tensor> fused_rope(const at::Tensor& q, const at::Tensor& k, const RopeCosSin& cs) {
  const auto f32_table = [&](const at::Tensor& t) {
    return t.defined() && t.scalar_type() == at::kFloat && t.device() == q.device() && !t.requires_grad() &&
           t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.is_contiguous() &&
           reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  if (!fused_ops_enabled() || !bf16_cuda(q) || !bf16_cuda(k) || q.dim() != 3 || k.dim() != 3 ||
      q.device() != k.device() || q.size(0) != k.size(0) || q.size(2) != k.size(2) ||
      !fused::rope_supported(q.size(2)) || !f32_table(cs.cos) || !f32_table(cs.sin))
    return {};
  variable_list out = RopeFn::apply(q, k, cs.cos, cs.sin);
  return {out[0], out[1]};
}

at::Tensor fused_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  if (!fused_ops_enabled() || !bf16_cuda(gate) || !bf16_cuda(up) || gate.sizes() != up.sizes() ||
      gate.device() != up.device())
    return {};
  return SwiGLUFn::apply(gate, up);
}

at::Tensor fused_cross_entropy_sum(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                   int64_t chunk_tokens, int64_t ignore_index) {
  if (!fused_ops_enabled() || !bf16_cuda(hidden) || !bf16_cuda(weight) || hidden.dim() != 2 || weight.dim() != 2 ||
      hidden.size(1) != weight.size(1) || hidden.size(0) == 0 || weight.size(0) == 0 ||
      hidden.device() != weight.device() || labels.device() != hidden.device() || labels.scalar_type() != at::kLong ||
      labels.dim() != 1 || labels.size(0) != hidden.size(0))
    return {};
  const int64_t V = weight.size(0);
  const int64_t chunk = chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(1, (ce_chunk_mib() << 20) / (V * 2));
  // Gradients are computed in the forward, so only when the backward can ask for them.
  const bool grad = c10::GradMode::is_enabled();
  const bool need_dh = grad && hidden.requires_grad(), need_dw = grad && weight.requires_grad();
  if (!need_dh && !need_dw) return cross_entropy_chunks(hidden, weight, labels, chunk, ignore_index, false, false).loss;
  return CrossEntropyFn::apply(hidden, weight, labels, chunk, ignore_index, need_dh, need_dw);
}

}  // namespace flexcp
