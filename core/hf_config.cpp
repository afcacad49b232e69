#include "core/hf_config.h"

#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/atomic_file.h"
#include "core/errors.h"

namespace flexcp {
namespace {

using nlohmann::json;

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string short_dump(const json& v) {
  std::string s = v.dump();
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// Typed access to one field of the JSON object; `src` names the file in messages. HF fills absent
// or null fields with LlamaConfig's defaults, and so do we (`fallback`); `required` fields have none.
struct Reader {
  const json& j;
  const std::string& src;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  [[noreturn]] void missing(const char* key) const {
    fail(src, std::string(key) + ": missing", "an HF Llama config.json needs it (see Llama-3.2-1B's config.json)");
  }

  int64_t integer(const json& v, const std::string& key) const {
    if (v.is_number_integer() || v.is_number_unsigned()) return v.get<int64_t>();
    // Some exporters write 2048.0; accept integral floats.
    if (v.is_number_float() && v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>())))
      return static_cast<int64_t>(v.get<double>());
    fail(src, key + ": expected an integer, got " + short_dump(v), "fix the value in config.json");
  }
  int64_t integer(const char* key, bool required, int64_t fallback = 0) const {
    if (!has(key)) {
      if (required) missing(key);
      return fallback;
    }
    return integer(j.at(key), key);
  }
  double number(const json& obj, const char* key, bool required, double fallback, const std::string& prefix) const {
    if (!obj.contains(key) || obj.at(key).is_null()) {
      if (required) missing((prefix + key).c_str());
      return fallback;
    }
    const json& v = obj.at(key);
    if (!v.is_number()) fail(src, prefix + key + ": expected a number, got " + short_dump(v), "fix the value in config.json");
    return v.get<double>();
  }
  double number(const char* key, bool required, double fallback) const { return number(j, key, required, fallback, ""); }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    if (!v.is_boolean()) fail(src, std::string(key) + ": expected true or false, got " + short_dump(v), "fix the value in config.json");
    return v.get<bool>();
  }
  std::string string(const char* key) const {
    if (!has(key)) return {};
    const json& v = j.at(key);
    if (!v.is_string()) fail(src, std::string(key) + ": expected a string, got " + short_dump(v), "fix the value in config.json");
    return v.get<std::string>();
  }
};

void parse_rope(const Reader& r, LlamaArch& a) {
  // transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions write
  // `rope_scaling` (null when there is none) next to a top-level `rope_theta`.
  const json* params = nullptr;
  std::string prefix;
  if (r.has("rope_parameters")) {
    params = &r.j.at("rope_parameters");
    prefix = "rope_parameters.";
  } else if (r.has("rope_scaling")) {
    params = &r.j.at("rope_scaling");
    prefix = "rope_scaling.";
  }
  if (params && !params->is_object())
    fail(r.src, prefix.substr(0, prefix.size() - 1) + ": expected an object, got " + short_dump(*params),
         "write null or {\"rope_type\": \"llama3\", ...}");

  a.rope_theta = r.number("rope_theta", false, 10000.0);
  if (params && params->contains("rope_theta")) a.rope_theta = r.number(*params, "rope_theta", true, 0, prefix);

  std::string type = "default";
  if (params) {
    const char* type_key = params->contains("rope_type") ? "rope_type" : (params->contains("type") ? "type" : nullptr);
    if (type_key) {
      const json& t = params->at(type_key);
      if (!t.is_string()) fail(r.src, prefix + type_key + ": expected a string, got " + short_dump(t), "write \"llama3\"");
      type = t.get<std::string>();
    }
  }
  if (type == "default") {
    a.rope_scaling = RopeScaling{};
    a.rope_scaling.type = "none";
    return;
  }
  if (type != "llama3")
    fail(r.src, prefix + "rope_type: '" + type + "' is not supported", "flexcp implements llama3 rope scaling or none (null)");
  a.rope_scaling.type = "llama3";
  a.rope_scaling.factor = r.number(*params, "factor", true, 0, prefix);
  a.rope_scaling.low_freq_factor = r.number(*params, "low_freq_factor", true, 0, prefix);
  a.rope_scaling.high_freq_factor = r.number(*params, "high_freq_factor", true, 0, prefix);
  const std::string omp_key = prefix + "original_max_position_embeddings";
  if (!params->contains("original_max_position_embeddings")) r.missing(omp_key.c_str());
  a.rope_scaling.original_max_position_embeddings = r.integer(params->at("original_max_position_embeddings"), omp_key);
}

int64_t token_id(const Reader& r, const char* key, int64_t fallback) {
  if (!r.has(key)) return fallback;
  const json& v = r.j.at(key);
  // Instruct models list several end-of-turn ids; the first is end-of-text.
  if (v.is_array()) {
    if (v.empty()) return fallback;
    return r.integer(v.at(0), std::string(key) + "[0]");
  }
  return r.integer(v, key);
}

std::string torch_dtype_name(const std::string& dtype) {
  if (dtype == "bf16" || dtype == "bfloat16") return "bfloat16";
  if (dtype == "fp32" || dtype == "float32") return "float32";
  if (dtype == "fp16" || dtype == "float16") return "float16";
  fail("hf_config_write", "dtype '" + dtype + "' is unknown", "use bf16, fp32 or fp16");
}

}  // namespace

LlamaArch hf_config_parse(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    fail(source, std::string("not valid JSON: ") + e.what(), "re-download or re-export config.json");
  }
  if (!j.is_object()) fail(source, "expected a JSON object at the top level", "point at a Hugging Face config.json");
  Reader r{j, source};

  const std::string model_type = r.string("model_type");
  if (model_type.empty()) {
    bool llama_arch = false;
    if (j.contains("architectures") && j["architectures"].is_array())
      for (const auto& name : j["architectures"]) llama_arch |= name.is_string() && name.get<std::string>() == "LlamaForCausalLM";
    if (!llama_arch) r.missing("model_type");
  } else if (model_type != "llama") {
    fail(source, "model_type is '" + model_type + "', not 'llama'", "flexcp trains Llama-architecture models only");
  }
  const std::string act = r.string("hidden_act");
  if (!act.empty() && act != "silu") fail(source, "hidden_act is '" + act + "'", "flexcp's Llama MLP uses silu");
  if (r.boolean("attention_bias", false)) fail(source, "attention_bias is true", "flexcp's Llama attention has no biases");
  if (r.boolean("mlp_bias", false)) fail(source, "mlp_bias is true", "flexcp's Llama MLP has no biases");

  LlamaArch a;
  a.vocab_size = r.integer("vocab_size", true);
  a.hidden_size = r.integer("hidden_size", true);
  a.intermediate_size = r.integer("intermediate_size", true);
  a.num_layers = r.integer("num_hidden_layers", true);
  a.num_heads = r.integer("num_attention_heads", true);
  a.num_kv_heads = r.integer("num_key_value_heads", false, a.num_heads);
  for (auto [key, value] : {std::pair<const char*, int64_t>{"vocab_size", a.vocab_size}, {"hidden_size", a.hidden_size},
                            {"intermediate_size", a.intermediate_size}, {"num_hidden_layers", a.num_layers},
                            {"num_attention_heads", a.num_heads}, {"num_key_value_heads", a.num_kv_heads}})
    if (value < 1) fail(source, std::string(key) + ": must be at least 1, got " + std::to_string(value), "fix config.json");
  if (a.num_heads % a.num_kv_heads != 0)
    fail(source, "num_attention_heads (" + std::to_string(a.num_heads) + ") is not a multiple of num_key_value_heads (" +
                     std::to_string(a.num_kv_heads) + ")", "fix config.json");
  if (r.has("head_dim")) {
    a.head_dim = r.integer("head_dim", true);
  } else {
    if (a.hidden_size % a.num_heads != 0)
      fail(source, "head_dim: missing and hidden_size is not a multiple of num_attention_heads", "add \"head_dim\" to config.json");
    a.head_dim = a.hidden_size / a.num_heads;
  }
  a.max_position_embeddings = r.integer("max_position_embeddings", false, 2048);
  a.rms_norm_eps = r.number("rms_norm_eps", false, 1e-6);
  a.tie_embeddings = r.boolean("tie_word_embeddings", false);
  parse_rope(r, a);
  a.bos_token_id = token_id(r, "bos_token_id", 1);
  a.eos_token_id = token_id(r, "eos_token_id", 2);
  return a;
}

LlamaArch hf_config_read(const std::string& path) {
  const std::string file = is_dir(path) ? path + "/config.json" : path;
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file, "cannot open", "point at a folder with a Hugging Face config.json (or the file itself)");
  std::ostringstream text;
  text << in.rdbuf();
  return hf_config_parse(text.str(), file);
}

std::string hf_config_to_json(const LlamaArch& a, const std::string& dtype, double initializer_range) {
  // ordered_json keeps the familiar HF key order, which makes diffs against real configs readable.
  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = a.bos_token_id;
  j["eos_token_id"] = a.eos_token_id;
  j["head_dim"] = a.head_dim;
  j["hidden_act"] = "silu";
  j["hidden_size"] = a.hidden_size;
  j["initializer_range"] = initializer_range;
  j["intermediate_size"] = a.intermediate_size;
  j["max_position_embeddings"] = a.max_position_embeddings;
  j["mlp_bias"] = false;
  j["model_type"] = "llama";
  j["num_attention_heads"] = a.num_heads;
  j["num_hidden_layers"] = a.num_layers;
  j["num_key_value_heads"] = a.num_kv_heads;
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = a.rms_norm_eps;
  if (a.rope_scaling.type == "llama3") {
    nlohmann::ordered_json rs;
    rs["factor"] = a.rope_scaling.factor;
    rs["high_freq_factor"] = a.rope_scaling.high_freq_factor;
    rs["low_freq_factor"] = a.rope_scaling.low_freq_factor;
    rs["original_max_position_embeddings"] = a.rope_scaling.original_max_position_embeddings;
    rs["rope_type"] = "llama3";
    j["rope_scaling"] = rs;
  } else if (a.rope_scaling.type == "none") {
    j["rope_scaling"] = nullptr;
  } else {
    fail("hf_config_write", "rope_scaling.type '" + a.rope_scaling.type + "' is unknown", "use llama3 or none");
  }
  j["rope_theta"] = a.rope_theta;
  j["tie_word_embeddings"] = a.tie_embeddings;
  j["torch_dtype"] = torch_dtype_name(dtype);
  j["use_cache"] = true;
  j["vocab_size"] = a.vocab_size;
  return j.dump(2) + "\n";
}

void hf_config_write(const LlamaArch& arch, const std::string& path, const std::string& dtype, double initializer_range) {
  const std::string file = is_dir(path) ? path + "/config.json" : path;
  write_file_atomic(file, hf_config_to_json(arch, dtype, initializer_range));
}

}  // namespace flexcp
