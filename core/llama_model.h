// The Llama decoder as a torch::nn::Module, with parameter names equal to HF transformers' names
// (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ..., lm_head.weight when
// untied), so HF weights load by name and our checkpoints load in transformers.
//
// Tokens of a micro-batch are flattened: B sequences of S tokens are one axis of T = B*S tokens,
// and the AttentionSpec keeps the sequences apart (docs/attention-spec.md). Position ids are given
// per token, so packed documents and context-parallel shards use the same forward.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <utility>

#include "core/attention_backend.h"
#include "core/attention_spec.h"
#include "core/llama_arch.h"
#include "core/rope.h"

namespace flexcp {

// HF's LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

struct LlamaAttentionImpl : torch::nn::Module {
  explicit LlamaAttentionImpl(const LlamaArch& arch);
  // x (T, hidden) -> (T, hidden)
  at::Tensor forward(const at::Tensor& x, const RopeCosSin& rope, const AttentionSpec& spec,
                     AttentionBackend& backend);
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t num_heads, num_kv_heads, head_dim;
};
TORCH_MODULE(LlamaAttention);

struct LlamaMLPImpl : torch::nn::Module {
  explicit LlamaMLPImpl(const LlamaArch& arch);
  at::Tensor forward(const at::Tensor& x);  // down(silu(gate(x)) * up(x))
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMLP);

struct LlamaDecoderLayerImpl : torch::nn::Module {
  explicit LlamaDecoderLayerImpl(const LlamaArch& arch);
  // x (T, hidden) -> h + mlp(post_attention_layernorm(h)) with h = x + self_attn(input_layernorm(x)).
  at::Tensor forward(const at::Tensor& x, const RopeCosSin& rope, const AttentionSpec& spec,
                     AttentionBackend& backend);
  // The same from x and normed = input_layernorm(x), also returning next_norm(out) (the next layer's
  // input_layernorm or the model's final norm; null: no norm, second result undefined). Each
  // residual add and the norm after it are one op (fused_add_rmsnorm on CUDA bf16; the plain add and
  // RMSNorm elsewhere, the same ops as forward), so the model passes (residual, normed) pairs.
  std::pair<at::Tensor, at::Tensor> forward_normed(const at::Tensor& x, const at::Tensor& normed,
                                                   RMSNormImpl* next_norm, const RopeCosSin& rope,
                                                   const AttentionSpec& spec, AttentionBackend& backend);
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// HF's LlamaModel (registered as "model" inside LlamaForCausalLM): embedding, layers, final norm.
struct LlamaBackboneImpl : torch::nn::Module {
  explicit LlamaBackboneImpl(const LlamaArch& arch);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaBackbone);

// HF's LlamaForCausalLM.
struct LlamaModelImpl : torch::nn::Module {
  // Builds the modules and initialises them as HF does: normal(0, init_std) for linear and
  // embedding weights, ones for norms (from the global torch generator; seed it for repeatability).
  LlamaModelImpl(const LlamaArch& arch, double init_std = 0.02);

  // tokens, positions: (T,) int64 on the model's device. Returns the final-normed hidden states
  // (T, hidden). `backend` defaults to the one set with set_attention_backend.
  at::Tensor forward_hidden(const at::Tensor& tokens, const at::Tensor& positions, const AttentionSpec& spec);
  at::Tensor forward_hidden(const at::Tensor& tokens, const at::Tensor& positions, const AttentionSpec& spec,
                            AttentionBackend& backend);

  // The output projection: lm_head.weight, or model.embed_tokens.weight when tied.
  at::Tensor lm_head_weight() const;
  // Full logits (T, vocab) in the hidden dtype. For tests and small T; training uses llama_loss.
  at::Tensor logits(const at::Tensor& hidden) const;

  void set_attention_backend(std::shared_ptr<AttentionBackend> backend) { backend_ = std::move(backend); }
  // Recompute each decoder layer in the backward pass instead of keeping its activations.
  void set_activation_checkpointing(bool on) { checkpointing_ = on; }
  bool activation_checkpointing() const { return checkpointing_; }

  // Re-draws every parameter as the constructor does.
  void reset_parameters_normal(double init_std);

  const LlamaArch& arch() const { return arch_; }
  const at::Tensor& inv_freq() const { return inv_freq_; }  // (head_dim/2,) fp32, CPU

  LlamaBackbone model{nullptr};
  torch::nn::Linear lm_head{nullptr};  // null when embeddings are tied

 private:
  LlamaArch arch_;
  at::Tensor inv_freq_;
  std::shared_ptr<AttentionBackend> backend_;
  bool checkpointing_ = false;
};
TORCH_MODULE(LlamaModel);

struct LossOptions {
  int64_t ignore_index = -100;
  // Tokens per chunk of the vocabulary projection; 0 picks a chunk whose logits take about 256 MiB
  // (fp32 logits in the torch path, bf16 in the fused CUDA one). Only one chunk of logits exists at
  // a time, in the forward and in the backward.
  int64_t chunk_tokens = 0;
  // The range check of the labels and their count cost a host sync when the labels are on the GPU.
  // The trainer turns them off: its labels are known good (the data loader checks every token id
  // on the host) and it does not use the count, which is then -1.
  bool check_labels = true;
};

struct LossResult {
  at::Tensor sum;     // scalar fp32: sum of the token losses (differentiable)
  int64_t count = 0;  // tokens whose label is not ignore_index (-1 without LossOptions::check_labels)
};

// Cross-entropy of next-token prediction from final-normed hidden states (T, hidden) and labels
// (T,) (already shifted: labels[t] is the token that should follow token t; ignore_index where
// there is none). Exact gradients for hidden and the output projection with no full (T, vocab)
// logits kept: each chunk's logits are recomputed in the backward pass. On CUDA with bf16 inputs the
// fused path (core/fused_ops.h) computes the gradients in the forward instead, chunk by chunk, and
// keeps them until the backward scales them. Throws UserError for a label outside [0, vocab) that
// is not ignore_index (unless LossOptions::check_labels is off).
LossResult llama_loss(LlamaModelImpl& model, const at::Tensor& hidden, const at::Tensor& labels,
                      const LossOptions& opts = {});
// The same over an explicit projection weight (vocab, hidden).
LossResult chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                 const LossOptions& opts = {});

}  // namespace flexcp
