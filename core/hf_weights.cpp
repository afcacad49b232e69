#include "core/hf_weights.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/errors.h"

namespace flexcp {
namespace fs = std::filesystem;

namespace {

std::string config_path_of(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return (fs::path(path) / "config.json").string();
  return path;
}

// Typed field readers that name the file and key in their messages.
struct JsonFields {
  const nlohmann::json& j;
  std::string where;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }
  int64_t get_int(const char* key) const {
    if (!has(key)) fail(where, std::string("missing \"") + key + "\"", "an HF Llama config.json has it");
    if (!j[key].is_number_integer()) fail(where, std::string("\"") + key + "\" must be an integer, got " + j[key].dump());
    return j[key].get<int64_t>();
  }
  int64_t get_int(const char* key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }
  double get_num(const char* key) const {
    if (!has(key)) fail(where, std::string("missing \"") + key + "\"", "an HF Llama config.json has it");
    if (!j[key].is_number()) fail(where, std::string("\"") + key + "\" must be a number, got " + j[key].dump());
    return j[key].get<double>();
  }
  double get_num(const char* key, double dflt) const { return has(key) ? get_num(key) : dflt; }
  bool get_bool(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    if (!j[key].is_boolean()) fail(where, std::string("\"") + key + "\" must be true or false, got " + j[key].dump());
    return j[key].get<bool>();
  }
  std::string get_str(const char* key, const std::string& dflt) const {
    if (!has(key)) return dflt;
    if (!j[key].is_string()) fail(where, std::string("\"") + key + "\" must be a string, got " + j[key].dump());
    return j[key].get<std::string>();
  }
};

std::string shape_text(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

std::string name_list(const std::vector<std::string>& names) {
  std::string s;
  const size_t shown = std::min<size_t>(names.size(), 5);
  for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > shown) s += " and " + std::to_string(names.size() - shown) + " more";
  return s;
}

std::string dtype_string(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: fail("hf_save_model", std::string("cannot save weights of type ") + c10::toString(t), "use float32 or bfloat16");
  }
}

}  // namespace

LlamaArch hf_arch_from_json(const nlohmann::json& cfg, const std::string& where) {
  if (!cfg.is_object()) fail(where, "not a JSON object", "expected an HF config.json");
  JsonFields f{cfg, where};
  const std::string model_type = f.get_str("model_type", "llama");
  if (model_type != "llama")
    fail(where, "model_type '" + model_type + "' is not supported", "flexcp runs Llama models (model_type \"llama\")");
  if (f.get_bool("attention_bias", false) || f.get_bool("mlp_bias", false))
    fail(where, "attention_bias / mlp_bias are true", "flexcp's Llama has no bias terms");
  const std::string act = f.get_str("hidden_act", "silu");
  if (act != "silu") fail(where, "hidden_act '" + act + "' is not supported", "only silu (SwiGLU) is implemented");

  LlamaArch a;
  a.vocab_size = f.get_int("vocab_size");
  a.hidden_size = f.get_int("hidden_size");
  a.intermediate_size = f.get_int("intermediate_size");
  a.num_layers = f.get_int("num_hidden_layers");
  a.num_heads = f.get_int("num_attention_heads");
  a.num_kv_heads = f.get_int("num_key_value_heads", a.num_heads);
  if (a.num_heads <= 0) fail(where, "\"num_attention_heads\" must be positive");
  a.head_dim = f.get_int("head_dim", a.hidden_size / a.num_heads);
  a.max_position_embeddings = f.get_int("max_position_embeddings", a.max_position_embeddings);
  a.rms_norm_eps = f.get_num("rms_norm_eps", 1e-6);  // LlamaConfig's default
  a.tie_embeddings = f.get_bool("tie_word_embeddings", false);  // LlamaConfig's default
  a.bos_token_id = f.get_int("bos_token_id", a.bos_token_id);
  if (cfg.contains("eos_token_id") && cfg["eos_token_id"].is_array()) {
    if (cfg["eos_token_id"].empty() || !cfg["eos_token_id"][0].is_number_integer())
      fail(where, "\"eos_token_id\" list must hold integers");
    a.eos_token_id = cfg["eos_token_id"][0].get<int64_t>();  // several stop tokens: the first is the document end
  } else {
    a.eos_token_id = f.get_int("eos_token_id", a.eos_token_id);
  }

  // RoPE: transformers 5 writes rope_parameters (rope_theta inside); 4.x writes rope_theta and
  // rope_scaling (null for plain RoPE). 5.x gives rope_scaling priority when both are present.
  nlohmann::json rope = nlohmann::json::object();
  std::string rope_key = "rope_parameters";
  if (f.has("rope_scaling")) {
    rope = cfg["rope_scaling"];
    rope_key = "rope_scaling";
  } else if (f.has("rope_parameters")) {
    rope = cfg["rope_parameters"];
  }
  if (!rope.is_object()) fail(where, "\"" + rope_key + "\" must be an object or null, got " + rope.dump());
  JsonFields r{rope, where + ": " + rope_key};
  a.rope_theta = r.has("rope_theta") ? r.get_num("rope_theta") : f.get_num("rope_theta", 10000.0);
  const std::string type = r.get_str("rope_type", r.get_str("type", "default"));
  if (type == "default") {
    a.rope_scaling.type = "none";
  } else if (type == "llama3") {
    a.rope_scaling.type = "llama3";
    a.rope_scaling.factor = r.get_num("factor");
    a.rope_scaling.low_freq_factor = r.get_num("low_freq_factor");
    a.rope_scaling.high_freq_factor = r.get_num("high_freq_factor");
    a.rope_scaling.original_max_position_embeddings =
        r.get_int("original_max_position_embeddings", a.max_position_embeddings);
  } else {
    fail(where, rope_key + ".rope_type '" + type + "' is not supported", "flexcp implements default and llama3 RoPE");
  }
  return a;
}

LlamaArch hf_read_arch(const std::string& path) {
  const std::string file = config_path_of(path);
  std::ifstream in(file);
  if (!in) fail(file, "cannot open", "point at an HF model folder with a config.json");
  nlohmann::json cfg;
  try {
    cfg = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(file, std::string("not valid JSON (") + e.what() + ")", "fix or re-download config.json");
  }
  return hf_arch_from_json(cfg, file);
}

nlohmann::json hf_arch_to_json(const LlamaArch& a, const std::string& dtype) {
  nlohmann::json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"hidden_act", "silu"},
      {"vocab_size", a.vocab_size},
      {"hidden_size", a.hidden_size},
      {"intermediate_size", a.intermediate_size},
      {"num_hidden_layers", a.num_layers},
      {"num_attention_heads", a.num_heads},
      {"num_key_value_heads", a.num_kv_heads},
      {"head_dim", a.head_dim},
      {"max_position_embeddings", a.max_position_embeddings},
      {"rms_norm_eps", a.rms_norm_eps},
      {"rope_theta", a.rope_theta},
      {"tie_word_embeddings", a.tie_embeddings},
      {"bos_token_id", a.bos_token_id},
      {"eos_token_id", a.eos_token_id},
      {"pretraining_tp", 1},
      {"use_cache", true},
      {"torch_dtype", dtype},
  };
  if (a.rope_scaling.type == "llama3") {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", a.rope_scaling.factor},
                         {"low_freq_factor", a.rope_scaling.low_freq_factor},
                         {"high_freq_factor", a.rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", a.rope_scaling.original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  return j;
}

void hf_load_weights(LlamaModelImpl& model, const std::string& path) {
  SafetensorsSet files = SafetensorsSet::open(path);
  const LlamaArch& arch = model.arch();
  auto params = model.named_parameters(/*recurse=*/true);

  std::vector<std::string> missing, unexpected;
  std::set<std::string> wanted;
  for (const auto& p : params) {
    wanted.insert(p.key());
    if (!files.contains(p.key())) missing.push_back(p.key());
  }
  bool stored_tied_head = false;
  for (const auto& n : files.names()) {
    if (wanted.count(n)) continue;
    if (arch.tie_embeddings && n == "lm_head.weight") {
      stored_tied_head = true;
      continue;
    }
    // Buffers some older checkpoints carry; recomputed from the config here as in transformers.
    if (n.size() > 19 && n.compare(n.size() - 19, 19, "rotary_emb.inv_freq") == 0) continue;
    unexpected.push_back(n);
  }
  if (!missing.empty())
    fail(files.source(), std::to_string(missing.size()) + " tensor(s) the model needs are missing: " + name_list(missing),
         "the weights do not match config.json (layers, tie_word_embeddings?)");
  if (!unexpected.empty())
    fail(files.source(), std::to_string(unexpected.size()) + " tensor(s) have no place in the model: " + name_list(unexpected),
         "the weights do not match config.json (num_hidden_layers, tie_word_embeddings?)");

  for (const auto& p : params) {
    const SafetensorsEntry& e = files.entry(p.key());
    if (!at::IntArrayRef(e.shape).equals(p.value().sizes()))
      fail(files.file_of(p.key()).path(), "tensor '" + p.key() + "' has shape " + shape_text(e.shape) +
                                              " but the model expects " + shape_text(p.value().sizes()),
           "the weights do not match the architecture (config.json or model settings)");
    if (!at::isFloatingType(e.dtype))
      fail(files.file_of(p.key()).path(), "tensor '" + p.key() + "' is " + e.dtype_name + ", not a floating-point type",
           "weights must be F32, BF16, F16 or F64");
  }
  torch::NoGradGuard no_grad;
  for (auto& p : params) p.value().copy_(files.view(p.key()));  // converts dtype and device
  if (stored_tied_head) {
    // Compared as stored, so a conversion to the model's dtype cannot make equal tensors differ.
    at::Tensor head = files.view("lm_head.weight");
    at::Tensor emb = files.view("model.embed_tokens.weight");
    if (!head.sizes().equals(emb.sizes()) || !at::equal(head.to(at::kFloat), emb.to(at::kFloat)))
      fail(files.file_of("lm_head.weight").path(),
           "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight",
           "set tie_word_embeddings to false in config.json (model.tie_embeddings)");
  }
}

NamedTensors hf_named_weights(const LlamaModelImpl& model, c10::optional<at::ScalarType> dtype) {
  NamedTensors out;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    at::Tensor t = p.value().detach();
    if (dtype) t = t.to(*dtype);
    out.emplace_back(p.key(), t);
  }
  return out;
}

void hf_save_model(const LlamaModelImpl& model, const std::string& folder, const HfSaveOptions& opts) {
  std::error_code ec;
  fs::create_directories(folder, ec);
  if (ec) fail(folder, "cannot create folder: " + ec.message(), "check permissions");
  NamedTensors weights = hf_named_weights(model, opts.dtype);
  const at::ScalarType saved = weights.empty() ? at::kFloat : weights.front().second.scalar_type();
  safetensors_save_sharded(folder, weights, opts.max_shard_bytes);
  safetensors_write_text_atomic((fs::path(folder) / "config.json").string(),
                                hf_arch_to_json(model.arch(), dtype_string(saved)).dump(2) + "\n");
}

}  // namespace flexcp
