#include "core/llama_model.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/nn/init.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/fused_ops.h"

namespace flexcp {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

void arch_validate(const LlamaArch& a) {
  auto positive = [](const char* key, int64_t v) {
    if (v <= 0) fail(std::string("model.") + key, "must be positive, got " + std::to_string(v));
  };
  positive("vocab_size", a.vocab_size);
  positive("hidden_size", a.hidden_size);
  positive("intermediate_size", a.intermediate_size);
  positive("num_layers", a.num_layers);
  positive("num_heads", a.num_heads);
  positive("num_kv_heads", a.num_kv_heads);
  positive("head_dim", a.head_dim);
  if (a.num_heads % a.num_kv_heads != 0)
    fail("model.num_kv_heads", "num_heads " + std::to_string(a.num_heads) + " is not a multiple of num_kv_heads " +
                                   std::to_string(a.num_kv_heads),
         "grouped-query attention needs num_heads % num_kv_heads == 0");
  if (!(a.rms_norm_eps > 0)) fail("model.rms_norm_eps", "must be positive");
}

torch::nn::Linear linear(int64_t in, int64_t out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)); }

// lin(x), through fused_linear where it applies (CUDA bf16, the optimizer's flat gradient buffer).
at::Tensor linear_apply(torch::nn::LinearImpl& lin, const at::Tensor& x) {
  if (at::Tensor y = fused_linear(x, lin.weight); y.defined()) return y;
  return lin.forward(x);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Modules

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  if (at::Tensor y = fused_rmsnorm(x, weight, eps); y.defined()) return y;  // CUDA bf16 (core/fused_ops.h)
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaArch& a)
    : num_heads(a.num_heads), num_kv_heads(a.num_kv_heads), head_dim(a.head_dim) {
  q_proj = register_module("q_proj", linear(a.hidden_size, a.num_heads * a.head_dim));
  k_proj = register_module("k_proj", linear(a.hidden_size, a.num_kv_heads * a.head_dim));
  v_proj = register_module("v_proj", linear(a.hidden_size, a.num_kv_heads * a.head_dim));
  o_proj = register_module("o_proj", linear(a.num_heads * a.head_dim, a.hidden_size));
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const RopeCosSin& rope, const AttentionSpec& spec,
                                       AttentionBackend& backend) {
  const int64_t T = x.size(0);
  at::Tensor q, k, v;
  // CUDA bf16 with the weights in one buffer (FlatAdamW's): one GEMM for q|k|v, RoPE in one kernel.
  if (auto qkv = fused_qkv_rope(x, q_proj->weight, k_proj->weight, v_proj->weight, rope, num_heads, num_kv_heads,
                                head_dim);
      !qkv.empty()) {
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    q = q_proj->forward(x).view({T, num_heads, head_dim});
    k = k_proj->forward(x).view({T, num_kv_heads, head_dim});
    v = v_proj->forward(x).view({T, num_kv_heads, head_dim});
    if (auto qk = fused_rope(q, k, rope); qk.first.defined()) {  // CUDA bf16: q and k in one kernel
      q = qk.first;
      k = qk.second;
    } else {
      q = rope_apply(q, rope);
      k = rope_apply(k, rope);
    }
  }
  at::Tensor out = backend.attend(q, k, v, spec, 1.0 / std::sqrt(static_cast<double>(head_dim)));
  return linear_apply(*o_proj, out.reshape({T, num_heads * head_dim}));
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaArch& a) {
  gate_proj = register_module("gate_proj", linear(a.hidden_size, a.intermediate_size));
  up_proj = register_module("up_proj", linear(a.hidden_size, a.intermediate_size));
  down_proj = register_module("down_proj", linear(a.intermediate_size, a.hidden_size));
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  // CUDA bf16 with the weights in one buffer (FlatAdamW's): one GEMM for gate|up, then SwiGLU.
  if (at::Tensor h = fused_gate_up_swiglu(x, gate_proj->weight, up_proj->weight); h.defined())
    return linear_apply(*down_proj, h);
  const at::Tensor gate = gate_proj->forward(x), up = up_proj->forward(x);
  at::Tensor h = fused_swiglu(gate, up);  // CUDA bf16 (core/fused_ops.h)
  if (!h.defined()) h = at::silu(gate) * up;
  return linear_apply(*down_proj, h);
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaArch& a) {
  self_attn = register_module("self_attn", LlamaAttention(a));
  mlp = register_module("mlp", LlamaMLP(a));
  input_layernorm = register_module("input_layernorm", RMSNorm(a.hidden_size, a.rms_norm_eps));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(a.hidden_size, a.rms_norm_eps));
}

namespace {

// {x + delta, norm(x + delta)}; without a norm, {x + delta, undefined}.
std::pair<at::Tensor, at::Tensor> residual_add_norm(const at::Tensor& x, const at::Tensor& delta, RMSNormImpl* norm) {
  if (norm == nullptr) return {x + delta, at::Tensor()};
  if (auto hy = fused_add_rmsnorm(x, delta, norm->weight, norm->eps); hy.first.defined()) return hy;  // CUDA bf16
  at::Tensor h = x + delta;
  return {h, norm->forward(h)};
}

}  // namespace

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const RopeCosSin& rope, const AttentionSpec& spec,
                                          AttentionBackend& backend) {
  return forward_normed(x, input_layernorm->forward(x), nullptr, rope, spec, backend).first;
}

std::pair<at::Tensor, at::Tensor> LlamaDecoderLayerImpl::forward_normed(const at::Tensor& x, const at::Tensor& normed,
                                                                        RMSNormImpl* next_norm, const RopeCosSin& rope,
                                                                        const AttentionSpec& spec,
                                                                        AttentionBackend& backend) {
  auto [h, h_normed] =
      residual_add_norm(x, self_attn->forward(normed, rope, spec, backend), post_attention_layernorm.get());
  return residual_add_norm(h, mlp->forward(h_normed), next_norm);
}

LlamaBackboneImpl::LlamaBackboneImpl(const LlamaArch& a) {
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(a.vocab_size, a.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < a.num_layers; ++i) layers->push_back(LlamaDecoderLayer(a));
  norm = register_module("norm", RMSNorm(a.hidden_size, a.rms_norm_eps));
}

// ------------------------------------------------------------------------------------------------
// Activation checkpointing: a layer's forward runs without a graph; the backward pass runs it
// again with one and differentiates that. Recomputation must give the same values: Llama layers
// have no dropout and the attention backends are deterministic in the forward.
//
// A layer maps (x, normed = input_layernorm(x)) to (out, next_norm(out)). Only x is kept: the
// backward recomputes normed from it with the layer's input_layernorm, which gives the values the
// forward received bit for bit (the previous layer's fused add + norm computes its norm output
// exactly as the norm alone does; the first layer's came from the same module). The parameters are
// the layer's own and next_norm's weight.

namespace {

struct CheckpointState : torch::CustomClassHolder {
  LlamaDecoderLayerImpl* layer = nullptr;  // owned by the model, which outlives its graphs
  RMSNormImpl* next_norm = nullptr;        // likewise
  RopeCosSin rope_copy;
  AttentionSpec spec;
  std::shared_ptr<AttentionBackend> backend;
};

std::vector<at::Tensor> checkpoint_params(const CheckpointState& state) {
  std::vector<at::Tensor> params = state.layer->parameters();
  params.push_back(state.next_norm->weight);
  return params;
}

struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& normed,
                               at::TensorList params, c10::intrusive_ptr<CheckpointState> state) {
    ctx->set_materialize_grads(false);  // the last layer's out reaches nothing: no zero gradient for it
    ctx->save_for_backward({x});
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    auto out = state->layer->forward_normed(x, normed, state->next_norm, state->rope_copy, state->spec, *state->backend);
    return {out.first, out.second};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto state = c10::static_intrusive_pointer_cast<CheckpointState>(ctx->saved_data["state"].toCapsule());
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    const at::Tensor x_saved = ctx->get_saved_variables()[0].detach();
    std::vector<at::Tensor> params = checkpoint_params(*state);
    TORCH_CHECK(static_cast<int64_t>(params.size()) == num_params, "checkpoint: layer parameters changed");
    at::Tensor normed;
    {
      torch::NoGradGuard no_grad;
      normed = state->layer->input_layernorm->forward(x_saved);
    }
    normed.requires_grad_(true);  // a leaf of its own: its gradient is the normed input's
    at::Tensor x = x_saved.detach().requires_grad_(true);
    variable_list inputs{x, normed};
    inputs.insert(inputs.end(), params.begin(), params.end());
    variable_list outs, grads_in;
    {
      torch::AutoGradMode grad_on(true);
      auto out = state->layer->forward_normed(x, normed, state->next_norm, state->rope_copy, state->spec, *state->backend);
      for (int i = 0; i < 2; ++i) {
        if (!grad_out[i].defined()) continue;
        outs.push_back(i == 0 ? out.first : out.second);
        grads_in.push_back(grad_out[i]);
      }
    }
    variable_list grads(inputs.size());
    if (!outs.empty())
      grads = torch::autograd::grad(outs, inputs, grads_in, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true);
    grads.push_back(at::Tensor());  // for the state argument
    return grads;
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// The whole model

LlamaModelImpl::LlamaModelImpl(const LlamaArch& arch, double init_std) : arch_(arch) {
  arch_validate(arch_);
  model = register_module("model", LlamaBackbone(arch_));
  if (!arch_.tie_embeddings) lm_head = register_module("lm_head", linear(arch_.hidden_size, arch_.vocab_size));
  inv_freq_ = rope_inv_freq(arch_);
  reset_parameters_normal(init_std);
}

void LlamaModelImpl::reset_parameters_normal(double init_std) {
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    if (p.key().size() >= 11 && p.key().compare(p.key().size() - 11, 11, "norm.weight") == 0)
      p.value().fill_(1.0);
    else
      torch::nn::init::normal_(p.value(), 0.0, init_std);
  }
}

at::Tensor LlamaModelImpl::forward_hidden(const at::Tensor& tokens, const at::Tensor& positions,
                                          const AttentionSpec& spec) {
  if (!backend_)
    fail("model", "no attention backend set", "call set_attention_backend (parallel.attention picks one)");
  return forward_hidden(tokens, positions, spec, *backend_);
}

at::Tensor LlamaModelImpl::forward_hidden(const at::Tensor& tokens, const at::Tensor& positions,
                                          const AttentionSpec& spec, AttentionBackend& backend) {
  TORCH_CHECK(tokens.dim() == 1 && positions.dim() == 1 && tokens.size(0) == positions.size(0),
              "forward_hidden: tokens and positions must both be (T,)");
  RopeCosSin rope = rope_cos_sin(inv_freq_, positions);
  at::Tensor x = model->embed_tokens->forward(tokens);
  const bool checkpoint = checkpointing_ && torch::GradMode::is_enabled();
  std::shared_ptr<AttentionBackend> backend_ref;
  if (checkpoint) {
    // The recomputation in the backward pass must reach the backend after this call returns; a
    // backend passed by reference is only borrowed, so checkpointing needs the owned one.
    if (backend_ && backend_.get() == &backend)
      backend_ref = backend_;
    else
      fail("model", "activation checkpointing needs the attention backend set with set_attention_backend");
  }
  // Layers pass (x, normed) pairs: each residual add and the norm after it (the next layer's
  // input_layernorm, or the final norm after the last layer) are one op; see forward_normed.
  const size_t num_layers = model->layers->size();
  at::Tensor normed = model->layers->at<LlamaDecoderLayerImpl>(0).input_layernorm->forward(x);
  for (size_t i = 0; i < num_layers; ++i) {
    auto* layer = &model->layers->at<LlamaDecoderLayerImpl>(i);
    RMSNormImpl* next_norm = i + 1 < num_layers ? model->layers->at<LlamaDecoderLayerImpl>(i + 1).input_layernorm.get()
                                                : model->norm.get();
    if (checkpoint) {
      auto state = c10::make_intrusive<CheckpointState>();
      state->layer = layer;
      state->next_norm = next_norm;
      state->rope_copy = rope;
      state->spec = spec;
      state->backend = backend_ref;
      std::vector<at::Tensor> params = checkpoint_params(*state);
      variable_list out = CheckpointedLayer::apply(x, normed, at::TensorList(params), state);
      x = out[0];
      normed = out[1];
    } else {
      std::tie(x, normed) = layer->forward_normed(x, normed, next_norm, rope, spec, backend);
    }
  }
  return normed;
}

at::Tensor LlamaModelImpl::lm_head_weight() const {
  return arch_.tie_embeddings ? model->embed_tokens->weight : lm_head->weight;
}

at::Tensor LlamaModelImpl::logits(const at::Tensor& hidden) const { return at::matmul(hidden, lm_head_weight().t()); }

// ------------------------------------------------------------------------------------------------
// Chunked cross-entropy

namespace {

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  // Returns the scalar fp32 sum of -log softmax(hidden @ weight^T)[label] over non-ignored tokens.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk, int64_t ignore_index) {
    const int64_t T = hidden.size(0);
    at::Tensor lse_all = at::empty({T}, hidden.options().dtype(at::kFloat));
    at::Tensor total = at::zeros({}, hidden.options().dtype(at::kFloat));
    for (int64_t s = 0; s < T; s += chunk) {
      const int64_t n = std::min(chunk, T - s);
      at::Tensor logits = at::matmul(hidden.narrow(0, s, n), weight.t()).to(at::kFloat);  // (n, V)
      at::Tensor lse = at::logsumexp(logits, {1});
      at::Tensor lab = labels.narrow(0, s, n);
      at::Tensor valid = lab.ne(ignore_index);
      at::Tensor safe = at::where(valid, lab, at::zeros_like(lab));
      at::Tensor picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1);
      total += ((lse - picked) * valid.to(at::kFloat)).sum();
      lse_all.narrow(0, s, n).copy_(lse);
    }
    ctx->save_for_backward({hidden, weight, labels, lse_all});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["ignore_index"] = ignore_index;
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &labels = saved[2], &lse_all = saved[3];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const at::Tensor g = grad_out[0].to(at::kFloat);
    const int64_t T = hidden.size(0);
    at::Tensor dhidden = at::empty_like(hidden);
    at::Tensor dweight = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
    for (int64_t s = 0; s < T; s += chunk) {
      const int64_t n = std::min(chunk, T - s);
      at::Tensor h = hidden.narrow(0, s, n);
      at::Tensor logits = at::matmul(h, weight.t()).to(at::kFloat);
      at::Tensor lab = labels.narrow(0, s, n);
      at::Tensor valid = lab.ne(ignore_index).to(at::kFloat);
      at::Tensor safe = at::where(lab.ne(ignore_index), lab, at::zeros_like(lab));
      // d(lse - logit[label]) / dlogits = softmax - onehot(label), zero for ignored rows.
      at::Tensor d = at::exp(logits - lse_all.narrow(0, s, n).unsqueeze(1));
      d.scatter_add_(1, safe.unsqueeze(1), -at::ones({n, 1}, d.options()));
      d.mul_((valid * g).unsqueeze(1));
      at::Tensor dl = d.to(hidden.scalar_type());
      dhidden.narrow(0, s, n).copy_(at::matmul(dl, weight));
      dweight.add_(at::matmul(dl.t(), h).to(at::kFloat));
    }
    return {dhidden, dweight.to(weight.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

LossResult chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                 const LossOptions& opts) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "chunked_cross_entropy: hidden (T, H) and weight (V, H) expected");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "chunked_cross_entropy: labels must be (T,)");
  const int64_t V = weight.size(0);
  at::Tensor lab = labels.to(hidden.device(), at::kLong);
  int64_t count = -1;
  if (opts.check_labels) {
    at::Tensor valid = lab.ne(opts.ignore_index);
    // One host sync for both numbers: the count, and how many labels are out of range.
    at::Tensor bad = (valid & (lab.lt(0) | lab.ge(V))).sum();
    at::Tensor both = at::stack({valid.sum(), bad}).to(at::kCPU);
    count = both[0].item<int64_t>();
    if (both[1].item<int64_t>() > 0)
      fail("labels", std::to_string(both[1].item<int64_t>()) + " label(s) outside [0, " + std::to_string(V) +
                         ") and not ignore_index " + std::to_string(opts.ignore_index),
           "the data's token ids must be below the model's vocab_size");
  }
  int64_t chunk = opts.chunk_tokens;
  if (chunk <= 0) chunk = std::max<int64_t>(1, (int64_t(256) << 20) / (V * 4));
  LossResult r;
  r.count = count;
  if (hidden.size(0) == 0) {
    r.sum = (hidden.sum() * 0).to(at::kFloat) + (weight.sum() * 0).to(at::kFloat);
    return r;
  }
  // CUDA bf16: gradients computed in the forward from bf16 logits (core/fused_ops_cuda.cpp).
  r.sum = fused_cross_entropy_sum(hidden, weight, lab, opts.chunk_tokens, opts.ignore_index);
  if (!r.sum.defined()) r.sum = ChunkedCrossEntropy::apply(hidden, weight, lab, chunk, opts.ignore_index);
  return r;
}

LossResult llama_loss(LlamaModelImpl& model, const at::Tensor& hidden, const at::Tensor& labels,
                      const LossOptions& opts) {
  return chunked_cross_entropy(hidden, model.lm_head_weight(), labels, opts);
}

}  // namespace flexcp
