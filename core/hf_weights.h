// HF model folders: config.json + model.safetensors (or shards with model.safetensors.index.json),
// read into and written from our LlamaModel with parameter names 1:1 to transformers' names.
// config.json itself is core/hf_config.h's (hf_config_read gives the LlamaArch to build the model).
#pragma once
#include <cstdint>
#include <string>

#include "core/llama_arch.h"
#include "core/llama_model.h"
#include "core/safetensors.h"

namespace flexcp {

// Copies the weights of an HF folder (or a single .safetensors file) into `model`, converting
// dtypes (floating types only) and moving to the parameters' device. Throws UserError, listing
// names, for tensors the model needs but the files lack, tensors the model has no place for, and
// shapes that differ from the architecture. With tied embeddings a stored lm_head.weight is
// accepted only if it equals model.embed_tokens.weight.
void hf_load_weights(LlamaModelImpl& model, const std::string& path);

// The model's tensors under their HF names (lm_head absent when tied), optionally cast.
NamedTensors hf_named_weights(const LlamaModelImpl& model, c10::optional<at::ScalarType> dtype = c10::nullopt);

struct HfSaveOptions {
  c10::optional<at::ScalarType> dtype;     // default: the parameters' dtype
  uint64_t max_shard_bytes = 5000000000;   // transformers' default "5GB"; 0 = one file
};

// Writes config.json (hf_config_write) and the weights into `folder` (created if needed), every file atomically,
// so that transformers' LlamaForCausalLM.from_pretrained(folder) loads it.
void hf_save_model(const LlamaModelImpl& model, const std::string& folder, const HfSaveOptions& opts = {});

}  // namespace flexcp
