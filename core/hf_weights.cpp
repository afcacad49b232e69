#include "core/hf_weights.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/hf_config.h"

namespace flexcp {
namespace fs = std::filesystem;

namespace {

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
    default: fail("hf_save_model", std::string("cannot save weights of type ") + c10::toString(t),
                  "save as float32, bfloat16 or float16");
  }
}

}  // namespace

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
  const std::string dtype = dtype_string(weights.empty() ? at::kFloat : weights.front().second.scalar_type());
  safetensors_save_sharded(folder, weights, opts.max_shard_bytes);
  hf_config_write(model.arch(), (fs::path(folder) / "config.json").string(), dtype);
}

}  // namespace flexcp
