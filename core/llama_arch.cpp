#include "core/llama_arch.h"

namespace flexcp {

bool llama_arch_preset(const std::string& name, LlamaArch& out) {
  LlamaArch a;  // defaults are Llama-3.2-1B
  if (name == "llama3.2-1b") {
    out = a;
    return true;
  }
  if (name == "tiny") {
    // Small enough to train on two CPU cores in minutes, with every feature of the real model:
    // GQA (4:2), Llama 3 rope scaling, tied embeddings, the real 128,256-token vocabulary.
    a.hidden_size = 128;
    a.intermediate_size = 384;
    a.num_layers = 4;
    a.num_heads = 4;
    a.num_kv_heads = 2;
    a.head_dim = 32;
    out = a;
    return true;
  }
  return false;
}

const char* llama_arch_preset_names() { return "llama3.2-1b, tiny"; }

int64_t llama_arch_num_params(const LlamaArch& a) {
  const int64_t h = a.hidden_size;
  const int64_t attn = h * a.num_heads * a.head_dim * 2 + h * a.num_kv_heads * a.head_dim * 2;
  const int64_t mlp = 3 * h * a.intermediate_size;
  const int64_t per_layer = attn + mlp + 2 * h;
  const int64_t emb = a.vocab_size * h * (a.tie_embeddings ? 1 : 2);
  return emb + a.num_layers * per_layer + h;
}

}  // namespace flexcp
