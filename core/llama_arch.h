// The shape of a Llama-family model: everything needed to build it, nothing about training.
// Filled from a preset, from an HF config.json, or from the YAML `model` section.
#pragma once
#include <cstdint>
#include <string>

namespace flexcp {

struct RopeScaling {
  std::string type = "llama3";  // "llama3" (Llama 3.1+ frequency scaling) or "none"
  double factor = 32.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaArch {
  int64_t vocab_size = 128256;
  int64_t hidden_size = 2048;
  int64_t intermediate_size = 8192;
  int64_t num_layers = 16;
  int64_t num_heads = 32;
  int64_t num_kv_heads = 8;
  int64_t head_dim = 64;
  int64_t max_position_embeddings = 131072;
  double rope_theta = 500000.0;
  double rms_norm_eps = 1e-5;
  bool tie_embeddings = true;
  RopeScaling rope_scaling;
  int64_t bos_token_id = 128000;
  int64_t eos_token_id = 128001;
};

// Named shapes: "llama3.2-1b" (the real Llama-3.2-1B) and "tiny" (a few layers, for CPU runs).
// Returns false when the name is unknown.
bool llama_arch_preset(const std::string& name, LlamaArch& out);
const char* llama_arch_preset_names();  // "llama3.2-1b, tiny" for error messages

// Parameter count (embedding counted once when tied).
int64_t llama_arch_num_params(const LlamaArch& a);

}  // namespace flexcp
