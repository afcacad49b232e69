// Hugging Face `config.json` of a Llama model <-> LlamaArch. Reading accepts what transformers writes
// for Llama 1/2/3/3.1/3.2 (head_dim and num_key_value_heads optional, rope_scaling null or llama3,
// the newer `rope_parameters` block); writing produces a file that transformers' LlamaForCausalLM
// loads, so flexcp checkpoints can be exported.
#pragma once
#include <string>

#include "core/llama_arch.h"

namespace flexcp {

// `path` is a config.json or a folder holding one. Throws UserError naming the file and the field
// (not a Llama model, a missing or mistyped field, an unsupported rope scaling).
LlamaArch hf_config_read(const std::string& path);
// Same, from the JSON text; `source` names it in messages.
LlamaArch hf_config_parse(const std::string& json_text, const std::string& source);

// The JSON text of an HF config.json for `arch`. `dtype` is the weights' dtype: bf16 | fp32 | fp16
// (or the torch names bfloat16 | float32 | float16).
std::string hf_config_to_json(const LlamaArch& arch, const std::string& dtype = "bf16",
                              double initializer_range = 0.02);
// Writes that text to `path` (a file name; a folder gets config.json inside) atomically.
void hf_config_write(const LlamaArch& arch, const std::string& path, const std::string& dtype = "bf16",
                     double initializer_range = 0.02);

}  // namespace flexcp
