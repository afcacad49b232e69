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
#include <vector>

#include "core/env_switch.h"
#include "core/fused_ops.h"
#include "cuda/train_kernels.h"

namespace flexcp {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{env_switch("FLEXCP_FUSED_OPS", true)};
  return on;
}

bool add_norm_enabled() {
  static const bool on = env_switch("FLEXCP_FUSED_ADD_NORM", true);
  return on;
}

bool packed_enabled() {
  static const bool on = env_switch("FLEXCP_FUSED_PACKED", true);
  return on;
}

bool wgrad_inplace_enabled() {
  static const bool on = env_switch("FLEXCP_FUSED_WGRAD", true);
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
// Residual add + RMSNorm: {h, y} = {x + delta, RMSNorm(h)}. Saves h (an output: the residual stream,
// which the next layer keeps alive anyway), the weight and rstd. Gradients that did not arrive stay
// undefined (no zero tensors): the last layer's h reaches nothing but its norm.

struct AddRMSNormFn : public torch::autograd::Function<AddRMSNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& delta_in,
                               const at::Tensor& w_in, double eps) {
    c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = dense(x_in), delta = dense(delta_in), w = dense(w_in);
    const int64_t cols = x.size(-1), rows = x.numel() / cols;
    at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    fused::add_rmsnorm_forward(x.data_ptr(), delta.data_ptr(), w.data_ptr(), h.data_ptr(), y.data_ptr(),
                               rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps), stream());
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({h, w, rstd});
    return {h, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &rstd = saved[2];
    c10::cuda::CUDAGuard guard(h.device());
    const at::Tensor& gh = grad_out[0];
    const at::Tensor& gy = grad_out[1];
    if (!gy.defined()) {  // only h was used: the plain add's gradient, for both inputs
      const at::Tensor dx = gh.defined() ? gh.to(at::kBFloat16) : at::Tensor();
      return {dx, dx, at::Tensor(), at::Tensor()};
    }
    const at::Tensor dy = dense(gy.to(at::kBFloat16));
    const at::Tensor dres = gh.defined() ? dense(gh.to(at::kBFloat16)) : at::Tensor();
    const int64_t cols = h.size(-1), rows = h.numel() / cols;
    at::Tensor dx = at::empty_like(h, at::MemoryFormat::Contiguous);
    at::Tensor dw = at::empty({cols}, h.options().dtype(at::kFloat));
    at::Tensor ws = at::empty({std::max<int64_t>(1, fused::rmsnorm_backward_workspace_floats(rows, cols))},
                              h.options().dtype(at::kFloat));
    fused::add_rmsnorm_backward(dy.data_ptr(), dres.defined() ? dres.data_ptr() : nullptr, h.data_ptr(), w.data_ptr(),
                                rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(), ws.data_ptr<float>(), rows,
                                cols, stream());
    // x and delta get the same gradient (as an add's backward gives it): one tensor for both.
    return {dx, dx, dw.to(w.scalar_type()), at::Tensor()};
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
// Packed projections: q|k|v (with RoPE) and gate|up (with SwiGLU) as one GEMM each, forward and
// backward (dx and dW), on weights that are one matrix already (rows_follow). The weight gradients
// go out as row blocks of the one dW, and x's gradient needs no sum over three or two GEMMs.

// Whether b's rows follow a's in one storage: [a; b] is then one matrix, with no copy.
bool rows_follow(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.is_contiguous() && b.is_contiguous() &&
         a.scalar_type() == b.scalar_type() && a.device() == b.device() &&
         a.storage().unsafeGetStorageImpl() == b.storage().unsafeGetStorageImpl() &&
         b.storage_offset() == a.storage_offset() + a.numel();
}

// `rows` rows from first's on, as one (rows, cols) matrix over first's storage (rows_follow holds).
at::Tensor stacked_rows(const at::Tensor& first, int64_t rows) {
  return first.detach().as_strided({rows, first.size(1)}, {first.size(1), 1}, first.storage_offset());
}

// Weight gradients added by the GEMM itself. When a weight's .grad is already a dense bf16 tensor
// (the optimizer binds each parameter's .grad to a view of its flat gradient buffer), dW = dy^T x is
// added into it by the GEMM (beta 1: one rounding of the fp32 sum), and the backward returns no
// gradient for the weight, so autograd's own accumulation (a separate add pass over every weight,
// reading dW and .grad and writing .grad) does not run. Without such a .grad (a model without the
// optimizer, a zero_grad that set it to none) dW goes back to autograd as usual. Activation
// checkpointing differentiates its recomputed layer with autograd::grad: these weights then come back
// without gradient there too, and the checkpoint passes none on, so nothing counts twice.
at::Tensor grad_target(const at::Tensor& w) {
  if (!wgrad_inplace_enabled() || !w.defined() || !w.is_leaf()) return {};
  const at::Tensor& g = w.grad();
  if (!g.defined() || g.scalar_type() != at::kBFloat16 || !g.is_contiguous() || g.sizes() != w.sizes() ||
      g.device() != w.device())
    return {};
  return g;
}

// dW = dy^T x for weights whose row blocks are ws (rows_follow, in order): {} for each when their
// gradients are one matrix that the GEMM added dW into, else the row blocks of dW.
std::vector<at::Tensor> weight_grads(const std::vector<at::Tensor>& ws, const at::Tensor& dy, const at::Tensor& x) {
  std::vector<at::Tensor> targets;
  bool inplace = true;
  for (const auto& w : ws) {
    targets.push_back(grad_target(w));
    inplace = inplace && targets.back().defined() && (targets.size() == 1 || rows_follow(targets[targets.size() - 2], targets.back()));
  }
  const int64_t rows = dy.size(1);
  if (inplace) {
    at::Tensor acc = stacked_rows(targets.front(), rows);
    acc.addmm_(dy.t(), x);
    return std::vector<at::Tensor>(ws.size());
  }
  const at::Tensor dw = at::mm(dy.t(), x);  // (rows, cols)
  std::vector<at::Tensor> out;
  int64_t start = 0;
  for (const auto& w : ws) {
    out.push_back(dw.narrow(0, start, w.size(0)));
    start += w.size(0);
  }
  return out;
}

// y = x w^T for 2-d x, with the weight gradient added in place (grad_target).
struct LinearFn : public torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    c10::cuda::CUDAGuard guard(x.device());
    ctx->save_for_backward({x, w});
    return at::mm(x, w.t());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor dy = grad_out[0].to(x.scalar_type()).contiguous();
    return {at::mm(dy, w), weight_grads({w}, dy, x)[0]};
  }
};

struct QkvRopeFn : public torch::autograd::Function<QkvRopeFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& wq, const at::Tensor& wk,
                               const at::Tensor& wv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads_q,
                               int64_t heads_kv, int64_t head_dim) {
    c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = dense(x_in);
    const int64_t tokens = x.size(0), rows = wq.size(0) + wk.size(0) + wv.size(0);
    const at::Tensor qkv = at::mm(x, stacked_rows(wq, rows).t());  // (tokens, rows)
    at::Tensor q = at::empty({tokens, heads_q, head_dim}, x.options());
    at::Tensor k = at::empty({tokens, heads_kv, head_dim}, x.options());
    at::Tensor v = at::empty({tokens, heads_kv, head_dim}, x.options());
    fused::rope_qkv_forward(qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr<float>(),
                            sin.data_ptr<float>(), tokens, heads_q, heads_kv, head_dim, stream());
    ctx->save_for_backward({x, wq, cos, sin, wk, wv});  // wk, wv: their .grad (weight_grads)
    ctx->saved_data["heads_q"] = heads_q;
    ctx->saved_data["heads_kv"] = heads_kv;
    return {q, k, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &wq = saved[1], &cos = saved[2], &sin = saved[3];
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t tokens = x.size(0), head_dim = cos.size(1);
    const int64_t heads_q = ctx->saved_data["heads_q"].toInt(), heads_kv = ctx->saved_data["heads_kv"].toInt();
    const int64_t nq = heads_q * head_dim, nkv = heads_kv * head_dim, rows = nq + 2 * nkv;
    // Outputs that did not reach the loss come as zeros (materialized grads).
    const at::Tensor dq = dense(grad_out[0].to(at::kBFloat16)), dk = dense(grad_out[1].to(at::kBFloat16)),
                     dv = dense(grad_out[2].to(at::kBFloat16));
    at::Tensor dqkv = at::empty({tokens, rows}, x.options());
    fused::rope_qkv_backward(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dqkv.data_ptr(), cos.data_ptr<float>(),
                             sin.data_ptr<float>(), tokens, heads_q, heads_kv, head_dim, stream());
    const at::Tensor dx = at::mm(dqkv, stacked_rows(wq, rows));
    const std::vector<at::Tensor> dw = weight_grads({wq, saved[4], saved[5]}, dqkv, x);
    return {dx, dw[0], dw[1], dw[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct GateUpSwiGLUFn : public torch::autograd::Function<GateUpSwiGLUFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& wg, const at::Tensor& wu) {
    c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = dense(x_in);
    const int64_t tokens = x.size(0), inner = wg.size(0);
    const at::Tensor y = at::mm(x, stacked_rows(wg, 2 * inner).t());  // (tokens, 2 * inner): gate | up
    at::Tensor h = at::empty({tokens, inner}, x.options());
    fused::swiglu_forward_rows(y.data_ptr(), y.narrow(1, inner, inner).data_ptr(), 2 * inner, h.data_ptr(), tokens,
                               inner, stream());
    ctx->save_for_backward({x, wg, y, wu});  // wu: its .grad (weight_grads)
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &wg = saved[1], &y = saved[2];
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t tokens = x.size(0), inner = wg.size(0);
    const at::Tensor dh = dense(grad_out[0].to(at::kBFloat16));
    at::Tensor dy = at::empty({tokens, 2 * inner}, x.options());
    fused::swiglu_backward_rows(dh.data_ptr(), y.data_ptr(), y.narrow(1, inner, inner).data_ptr(), 2 * inner,
                                dy.data_ptr(), dy.narrow(1, inner, inner).data_ptr(), tokens, inner, stream());
    const at::Tensor dx = at::mm(dy, stacked_rows(wg, 2 * inner));
    const std::vector<at::Tensor> dw = weight_grads({wg, saved[3]}, dy, x);
    return {dx, dw[0], dw[1]};
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
// the fp32 dW accumulation (1 GiB read and written per chunk at the 1B shapes) and longer-K GEMMs,
// at the price of the chunk's logits buffer. On the H100 (Llama-3.2-1B, seq 8192) 1 GiB instead of
// 256 MiB took the loss phase from 22.9 to 18.9 ms for +0.7 GiB of peak memory; 2 GiB holds all
// 8192 rows of the 128,256-word vocabulary in one chunk (one dW pass; docs/performance.md has the A/B).
// FLEXCP_CE_CHUNK_MIB overrides it (A/B timings, tight memory).
int64_t ce_chunk_mib() {
  static const int64_t mib = env_positive_int("FLEXCP_CE_CHUNK_MIB", 2048);
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
    ctx->save_for_backward({r.dhidden, r.dweight, weight});  // weight: its .grad (grad_target)
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return r.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &dh = saved[0], &dw = saved[1];
    const at::Tensor g = grad_out[0].to(at::kFloat);
    at::Tensor dhidden, dweight;
    if (dh.defined()) dhidden = at::mul(dh, g);  // bf16 result, product in fp32
    if (at::Tensor target = dw.defined() ? grad_target(saved[2]) : at::Tensor(); target.defined()) {
      target.addcmul_(dw, g);  // .grad += dw * g in one pass (fp32 math, one rounding); autograd adds nothing
    } else if (dw.defined()) {
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

std::pair<at::Tensor, at::Tensor> fused_add_rmsnorm(const at::Tensor& x, const at::Tensor& delta,
                                                    const at::Tensor& weight, double eps) {
  if (!fused_ops_enabled() || !add_norm_enabled() || !bf16_cuda(x) || !bf16_cuda(delta) || !bf16_cuda(weight) ||
      x.dim() < 1 || weight.dim() != 1 || x.sizes() != delta.sizes() || x.device() != delta.device() ||
      x.device() != weight.device() || weight.size(0) != x.size(-1) || !fused::rmsnorm_supported(x.size(-1)))
    return {};
  variable_list out = AddRMSNormFn::apply(x, delta, weight, eps);
  return {out[0], out[1]};
}

namespace {

// A cos or sin table the rope kernels take: fp32 (tokens, head_dim), dense, aligned, on the device.
bool rope_table_ok(const at::Tensor& t, int64_t tokens, int64_t head_dim, const at::Device& device) {
  return t.defined() && t.scalar_type() == at::kFloat && t.device() == device && !t.requires_grad() && t.dim() == 2 &&
         t.size(0) == tokens && t.size(1) == head_dim && t.is_contiguous() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> fused_rope(const at::Tensor& q, const at::Tensor& k, const RopeCosSin& cs) {
  if (!fused_ops_enabled() || !bf16_cuda(q) || !bf16_cuda(k) || q.dim() != 3 || k.dim() != 3 ||
      q.device() != k.device() || q.size(0) != k.size(0) || q.size(2) != k.size(2) ||
      !fused::rope_supported(q.size(2)) || !rope_table_ok(cs.cos, q.size(0), q.size(2), q.device()) ||
      !rope_table_ok(cs.sin, q.size(0), q.size(2), q.device()))
    return {};
  variable_list out = RopeFn::apply(q, k, cs.cos, cs.sin);
  return {out[0], out[1]};
}

std::vector<at::Tensor> fused_qkv_rope(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                       const at::Tensor& wv, const RopeCosSin& cs, int64_t heads_q, int64_t heads_kv,
                                       int64_t head_dim) {
  if (!fused_ops_enabled() || !packed_enabled() || !bf16_cuda(x) || !bf16_cuda(wq) || x.dim() != 2 ||
      x.size(0) == 0 || wq.dim() != 2 || x.size(1) != wq.size(1) || x.device() != wq.device() ||
      !fused::rope_supported(head_dim) || heads_q <= 0 || heads_kv <= 0 || wq.size(0) != heads_q * head_dim ||
      wk.dim() != 2 || wk.size(0) != heads_kv * head_dim || wv.dim() != 2 || wv.size(0) != heads_kv * head_dim ||
      !rows_follow(wq, wk) || !rows_follow(wk, wv) || !rope_table_ok(cs.cos, x.size(0), head_dim, x.device()) ||
      !rope_table_ok(cs.sin, x.size(0), head_dim, x.device()))
    return {};
  return QkvRopeFn::apply(x, wq, wk, wv, cs.cos, cs.sin, heads_q, heads_kv, head_dim);
}

at::Tensor fused_gate_up_swiglu(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu) {
  if (!fused_ops_enabled() || !packed_enabled() || !bf16_cuda(x) || !bf16_cuda(wg) || x.dim() != 2 ||
      x.size(0) == 0 || wg.dim() != 2 || x.size(1) != wg.size(1) || x.device() != wg.device() ||
      wu.dim() != 2 || wu.size(0) != wg.size(0) || !rows_follow(wg, wu))
    return {};
  return GateUpSwiGLUFn::apply(x, wg, wu);
}

at::Tensor fused_linear(const at::Tensor& x, const at::Tensor& w) {
  if (!fused_ops_enabled() || !bf16_cuda(x) || !bf16_cuda(w) || x.dim() != 2 || w.dim() != 2 ||
      x.size(1) != w.size(1) || x.device() != w.device() || !grad_target(w).defined())
    return {};
  return LinearFn::apply(x, w);
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
