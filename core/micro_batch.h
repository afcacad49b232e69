// A micro-batch as the model sees it: B windows folded into one token axis with labels, position
// ids and the attention spec (one CAUSAL slice per sample, or per document with document_mask).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "core/attention_spec.h"
#include "core/data_loader.h"

namespace flexcp {

struct MicroBatch {
  at::Tensor tokens;     // (B*S,) int64
  at::Tensor labels;     // (B*S,) int64: the next token
  at::Tensor positions;  // (B*S,) int64: position inside its sample (RoPE)
  AttentionSpec spec;
  std::vector<int64_t> sample_starts;  // offsets of each sample in the token axis
};

MicroBatch micro_batch_build(const std::vector<TokenWindow>& windows, bool document_mask, const at::Device& device);

}  // namespace flexcp
