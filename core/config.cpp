// The run config. Everything about a key lives in one row of kFields below: its dotted name, where it
// is stored in RunConfig, its type and allowed values, and a one-line description. YAML parsing,
// `--set` overrides, did-you-mean suggestions, config_to_yaml and config_reference_markdown are all
// loops over that table, so a new setting is one new row (plus its field in config.h, whose
// initializer is the default).
#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <variant>

#include "core/errors.h"
#include "core/hf_config.h"

namespace flexcp {
namespace {

// ---------------------------------------------------------------------------------------------
// The field table

using Ref = std::variant<int64_t*, double*, bool*, std::string*>;
using RefFn = Ref (*)(RunConfig&);
#define FLEXCP_REF(member) [](RunConfig& c) -> Ref { return &c.member; }

enum class Kind { Int, Float, Bool, String, Enum };

struct Field {
  std::string key;  // "train.lr"
  RefFn ref;
  std::string doc;
  Kind kind = Kind::String;
  std::vector<std::string> choices;  // Enum: allowed values
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false, hi_open = false;  // strict bounds
  bool arch = false;                      // default comes from the model preset / config.json
  std::vector<std::string> aliases;       // names users may try (HF names), for did-you-mean only

  Field(std::string k, RefFn r, std::string d) : key(std::move(k)), ref(r), doc(std::move(d)) {
    RunConfig probe;
    switch (ref(probe).index()) {
      case 0: kind = Kind::Int; break;
      case 1: kind = Kind::Float; break;
      case 2: kind = Kind::Bool; break;
      default: kind = Kind::String; break;
    }
  }
  Field&& at_least(double v) && { lo = v; return std::move(*this); }
  Field&& above(double v) && { lo = v; lo_open = true; return std::move(*this); }
  Field&& below(double v) && { hi = v; hi_open = true; return std::move(*this); }
  Field&& one_of(std::vector<std::string> c) && { kind = Kind::Enum; choices = std::move(c); return std::move(*this); }
  Field&& from_arch() && { arch = true; return std::move(*this); }
  Field&& alias(std::string a) && { aliases.push_back(std::move(a)); return std::move(*this); }

  std::string section() const { return key.substr(0, key.rfind('.')); }
  std::string leaf() const { return key.substr(key.rfind('.') + 1); }
};

std::vector<std::string> split_list(const std::string& s) {  // "a, b" -> {a, b}
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

struct Section {
  std::string name;
  std::string doc;
};

// Sections in print order. A subsection (model.rope_scaling) must follow all plain fields of its parent.
const std::vector<Section>& sections() {
  static const std::vector<Section> s = {
      {"model", "The network: a named preset or an HF folder (`from`), then any architecture key overrides it."},
      {"model.rope_scaling", "Llama 3 rotary-frequency scaling (HF `rope_scaling`)."},
      {"data", "Training tokens: a folder of shards made by `flexcp prepare-data`, or synthetic tokens."},
      {"train", "Optimization: batch, sequence, AdamW, learning-rate schedule, precision, device."},
      {"parallel", "Context parallelism, the attention back-end and the communication between ranks."},
      {"checkpoint", "Where and how often the run is saved."},
      {"logging", "Run folder and console output."},
  };
  return s;
}

const std::vector<Field>& fields() {
  static const std::vector<Field> f = [] {
    std::vector<Field> v;
    // model
    v.push_back(Field("model.preset", FLEXCP_REF(model.preset), "named architecture; ignored when `from` is set")
                    .one_of(split_list(llama_arch_preset_names())));
    v.push_back(Field("model.from", FLEXCP_REF(model.from),
                      "HF model folder: architecture from its config.json (weights from `*.safetensors` when present); "
                      "empty = use `preset`"));
    v.push_back(Field("model.init_std", FLEXCP_REF(model.init_std), "std of the normal init of fresh weights (HF initializer_range)")
                    .above(0).alias("initializer_range"));
    v.push_back(Field("model.vocab_size", FLEXCP_REF(model.arch.vocab_size), "token vocabulary size").at_least(1).from_arch());
    v.push_back(Field("model.hidden_size", FLEXCP_REF(model.arch.hidden_size), "model width").at_least(1).from_arch());
    v.push_back(Field("model.intermediate_size", FLEXCP_REF(model.arch.intermediate_size), "MLP inner width")
                    .at_least(1).from_arch());
    v.push_back(Field("model.num_layers", FLEXCP_REF(model.arch.num_layers), "transformer blocks")
                    .at_least(1).from_arch().alias("num_hidden_layers").alias("layers"));
    v.push_back(Field("model.num_heads", FLEXCP_REF(model.arch.num_heads), "query heads")
                    .at_least(1).from_arch().alias("num_attention_heads"));
    v.push_back(Field("model.num_kv_heads", FLEXCP_REF(model.arch.num_kv_heads), "key/value heads (GQA); divides num_heads")
                    .at_least(1).from_arch().alias("num_key_value_heads"));
    v.push_back(Field("model.head_dim", FLEXCP_REF(model.arch.head_dim), "width of one head (even, for RoPE)").at_least(2).from_arch());
    v.push_back(Field("model.max_position_embeddings", FLEXCP_REF(model.arch.max_position_embeddings),
                      "longest position the model supports; seq_len may not exceed it")
                    .at_least(1).from_arch());
    v.push_back(Field("model.rope_theta", FLEXCP_REF(model.arch.rope_theta), "RoPE base frequency").above(0).from_arch());
    v.push_back(Field("model.rms_norm_eps", FLEXCP_REF(model.arch.rms_norm_eps), "RMSNorm epsilon").above(0).from_arch());
    v.push_back(Field("model.tie_embeddings", FLEXCP_REF(model.arch.tie_embeddings), "output head shares the embedding matrix")
                    .from_arch().alias("tie_word_embeddings"));
    v.push_back(Field("model.bos_token_id", FLEXCP_REF(model.arch.bos_token_id), "begin-of-text token id").at_least(0).from_arch());
    v.push_back(Field("model.eos_token_id", FLEXCP_REF(model.arch.eos_token_id), "end-of-text token id").at_least(0).from_arch());
    v.push_back(Field("model.rope_scaling.type", FLEXCP_REF(model.arch.rope_scaling.type),
                      "llama3 = Llama 3.1+ frequency scaling; none = plain RoPE")
                    .one_of({"llama3", "none"}).from_arch().alias("rope_type"));
    v.push_back(Field("model.rope_scaling.factor", FLEXCP_REF(model.arch.rope_scaling.factor), "context extension factor")
                    .above(0).from_arch());
    v.push_back(Field("model.rope_scaling.low_freq_factor", FLEXCP_REF(model.arch.rope_scaling.low_freq_factor),
                      "wavelengths above original_max / low_freq_factor are scaled fully")
                    .above(0).from_arch());
    v.push_back(Field("model.rope_scaling.high_freq_factor", FLEXCP_REF(model.arch.rope_scaling.high_freq_factor),
                      "wavelengths below original_max / high_freq_factor are kept")
                    .above(0).from_arch());
    v.push_back(Field("model.rope_scaling.original_max_position_embeddings",
                      FLEXCP_REF(model.arch.rope_scaling.original_max_position_embeddings),
                      "context length the unscaled frequencies were trained for")
                    .at_least(1).from_arch());
    // data
    v.push_back(Field("data.path", FLEXCP_REF(data.path), "folder with manifest.json made by `flexcp prepare-data`")
                    .alias("dir").alias("dataset"));
    v.push_back(Field("data.synthetic", FLEXCP_REF(data.synthetic), "random tokens instead of shards (benchmarks, smoke tests)"));
    v.push_back(Field("data.document_mask", FLEXCP_REF(data.document_mask),
                      "one causal slice per document inside each window (packed-document attention)"));
    // train
    v.push_back(Field("train.steps", FLEXCP_REF(train.steps), "optimizer steps").at_least(1).alias("max_steps").alias("iters"));
    v.push_back(Field("train.global_batch", FLEXCP_REF(train.global_batch),
                      "sequences per optimizer step, over all data-parallel ranks")
                    .at_least(1).alias("batch_size"));
    v.push_back(Field("train.micro_batch", FLEXCP_REF(train.micro_batch), "sequences per forward/backward on one rank")
                    .at_least(1).alias("micro_batch_size"));
    v.push_back(Field("train.seq_len", FLEXCP_REF(train.seq_len), "tokens per sequence (training window)")
                    .at_least(1).alias("seq_length").alias("sequence_length").alias("context_length"));
    v.push_back(Field("train.lr", FLEXCP_REF(train.lr), "peak learning rate (reached after warm-up)")
                    .above(0).alias("learning_rate"));
    v.push_back(Field("train.warmup", FLEXCP_REF(train.warmup), "linear warm-up steps from 0 to lr")
                    .at_least(0).alias("warmup_steps"));
    v.push_back(Field("train.schedule", FLEXCP_REF(train.schedule), "learning-rate decay after warm-up, down to min_lr")
                    .one_of({"cosine", "linear", "constant"}).alias("lr_schedule"));
    v.push_back(Field("train.min_lr", FLEXCP_REF(train.min_lr), "learning rate at the last step (cosine, linear)").at_least(0));
    v.push_back(Field("train.weight_decay", FLEXCP_REF(train.weight_decay), "AdamW decoupled weight decay (not on norms)")
                    .at_least(0));
    v.push_back(Field("train.beta1", FLEXCP_REF(train.beta1), "AdamW first-moment decay").at_least(0).below(1));
    v.push_back(Field("train.beta2", FLEXCP_REF(train.beta2), "AdamW second-moment decay").at_least(0).below(1));
    v.push_back(Field("train.eps", FLEXCP_REF(train.eps), "AdamW epsilon").above(0));
    v.push_back(Field("train.grad_clip", FLEXCP_REF(train.grad_clip), "max global gradient norm; 0 disables clipping")
                    .at_least(0).alias("max_grad_norm"));
    v.push_back(Field("train.seed", FLEXCP_REF(train.seed), "seed of weight init and data order").at_least(0));
    v.push_back(Field("train.dtype", FLEXCP_REF(train.dtype),
                      "compute dtype; auto = bf16 on GPU (fp32 master weights), fp32 on CPU")
                    .one_of({"auto", "fp32", "bf16"}).alias("precision"));
    v.push_back(Field("train.device", FLEXCP_REF(train.device), "where to train; auto = cuda when available")
                    .one_of({"auto", "cpu", "cuda"}));
    v.push_back(Field("train.activation_checkpointing", FLEXCP_REF(train.activation_checkpointing),
                      "recompute each block in the backward to save memory")
                    .alias("gradient_checkpointing"));
    v.push_back(Field("train.val_every", FLEXCP_REF(train.val_every), "steps between validation passes; 0 disables")
                    .at_least(0).alias("eval_every"));
    v.push_back(Field("train.val_batches", FLEXCP_REF(train.val_batches), "micro-batches per validation pass").at_least(1));
    v.push_back(Field("train.on_nonfinite", FLEXCP_REF(train.on_nonfinite),
                      "a step whose loss or gradient norm is NaN/inf: stop (dump batch ids and norms, exit) or skip its update")
                    .one_of({"stop", "skip"}));
    v.push_back(Field("train.max_skipped_steps", FLEXCP_REF(train.max_skipped_steps),
                      "with on_nonfinite: skip, the run stops after skipping more than this many steps")
                    .at_least(0));
    v.push_back(Field("train.spike_factor", FLEXCP_REF(train.spike_factor),
                      "log a loss spike when the loss exceeds this multiple of its running mean; 0 disables")
                    .at_least(0));
    // parallel
    v.push_back(Field("parallel.cp", FLEXCP_REF(parallel.cp),
                      "context-parallel size (power of two); data-parallel size = world size / cp")
                    .at_least(1).alias("context_parallel"));
    v.push_back(Field("parallel.attention", FLEXCP_REF(parallel.attention),
                      "attention kernels: reference (exact fp32, small models), torch (SDPA), ffa (our CUDA kernels)")
                    .one_of({"reference", "torch", "ffa"}).alias("attn"));
    v.push_back(Field("parallel.cp_chunk_size", FLEXCP_REF(parallel.cp_chunk_size),
                      "dispatch chunk in tokens; 0 = ceil(seq_len / (8 * cp))")
                    .at_least(0).alias("chunk_size"));
    v.push_back(Field("parallel.communicator", FLEXCP_REF(parallel.communicator),
                      "collectives between ranks; auto = nccl on GPU, mpi under mpirun on CPU, tcp (sockets) under "
                      "flexcp launch / torchrun / Slurm on CPU, none for one process")
                    .one_of({"auto", "mpi", "tcp", "nccl", "none"}));
    v.push_back(Field("parallel.deterministic", FLEXCP_REF(parallel.deterministic),
                      "fixed reduction order in the attention backward (bitwise-reproducible, slower)"));
    v.push_back(Field("parallel.timeout_s", FLEXCP_REF(parallel.timeout_s),
                      "seconds a collective may wait for the other ranks; then this rank names the late or dead rank "
                      "and exits with code 3 (0 waits forever). Must exceed the longest time one rank works alone "
                      "while the others wait, such as rank 0 writing a checkpoint")
                    .at_least(0).alias("timeout"));
    // checkpoint
    v.push_back(Field("checkpoint.dir", FLEXCP_REF(checkpoint.dir), "checkpoint folder; empty = <logging.dir>/checkpoints"));
    v.push_back(Field("checkpoint.every", FLEXCP_REF(checkpoint.every), "steps between checkpoints; 0 = none before the end (see at_end)")
                    .at_least(0).alias("save_every"));
    v.push_back(Field("checkpoint.at_end", FLEXCP_REF(checkpoint.at_end),
                      "also save after the last step; false for benchmarks and throw-away runs"));
    v.push_back(Field("checkpoint.keep_last", FLEXCP_REF(checkpoint.keep_last), "newest checkpoints kept (older ones are deleted); 0 keeps all")
                    .at_least(0));
    // logging
    v.push_back(Field("logging.dir", FLEXCP_REF(logging.dir), "run folder: metrics.jsonl, config.yaml, checkpoints/")
                    .alias("out_dir").alias("output_dir"));
    v.push_back(Field("logging.every", FLEXCP_REF(logging.every), "console line every N steps (metrics.jsonl gets every step)")
                    .at_least(1).alias("log_every"));
    v.push_back(Field("logging.quiet", FLEXCP_REF(logging.quiet), "no per-step console lines"));
    v.push_back(Field("logging.csv", FLEXCP_REF(logging.csv), "also write metrics.csv (the fields of metrics.jsonl)"));
    return v;
  }();
  return f;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (f.key == key) return &f;
  return nullptr;
}

bool is_section(const std::string& key) {
  for (const auto& s : sections())
    if (s.name == key) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Values: formatting and typed parsing

std::string num(int64_t v) { return std::to_string(v); }

// Shortest text that reads back to exactly x, written like Python's repr (fixed for 1e-4 <= |x| < 1e16,
// else scientific) and always with a '.' in the mantissa, so YAML 1.1 readers (PyYAML) see a float too:
// 500000.0, 0.0003, 1.0e-05.
std::string format_double(double x) {
  if (!std::isfinite(x)) return x != x ? ".nan" : (x > 0 ? ".inf" : "-.inf");  // never passes validation
  char buf[64];
  auto sci = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string s(buf, sci.ptr);
  const int exp10 = std::atoi(s.c_str() + s.find('e') + 1);
  if (x != 0 && (exp10 < -4 || exp10 >= 16)) {
    const auto e = s.find('e');
    if (s.substr(0, e).find('.') == std::string::npos) s.insert(e, ".0");
    return s;
  }
  auto fix = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::fixed);
  s.assign(buf, fix.ptr);
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

bool yaml_needs_quotes(const std::string& s) {
  if (s.empty()) return true;
  static const std::set<std::string> reserved = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"};
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (reserved.count(lower)) return true;
  char* end = nullptr;
  std::strtod(s.c_str(), &end);
  if (end && *end == '\0') return true;  // looks like a number
  if (!(std::isalnum(static_cast<unsigned char>(s[0])) || s[0] == '_' || s[0] == '.' || s[0] == '/')) return true;
  for (unsigned char c : s)
    if (!(std::isalnum(c) || c == '_' || c == '.' || c == '/' || c == '-' || c == '+')) return true;
  return false;
}

std::string yaml_quote(const std::string& s) {
  if (!yaml_needs_quotes(s)) return s;
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\x%02x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string format_value(const Field& f, const RunConfig& cfg) {
  const Ref r = f.ref(const_cast<RunConfig&>(cfg));
  if (auto p = std::get_if<int64_t*>(&r)) return std::to_string(**p);
  if (auto p = std::get_if<double*>(&r)) return format_double(**p);
  if (auto p = std::get_if<bool*>(&r)) return **p ? "true" : "false";
  return yaml_quote(*std::get<std::string*>(r));
}

std::string kind_noun(const Field& f) {
  switch (f.kind) {
    case Kind::Int: return "an integer";
    case Kind::Float: return "a number";
    case Kind::Bool: return "true or false";
    case Kind::String: return "a string";
    case Kind::Enum: break;
  }
  std::string s = "one of ";
  for (size_t i = 0; i < f.choices.size(); ++i) s += (i ? ", " : "") + f.choices[i];
  return s;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Closest candidate within a typo's reach, or "".
std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_d) best_d = d, best = c;
  }
  const size_t reach = std::max<size_t>(2, word.size() / 3);
  return best_d <= reach ? best : std::string();
}

std::string leaf_of(const std::string& key) { return key.substr(key.rfind('.') + 1); }
std::string parent_of(const std::string& key) {
  const auto dot = key.rfind('.');
  return dot == std::string::npos ? std::string() : key.substr(0, dot);
}

// "did you mean X?" for an unknown dotted key, else the keys that are valid where it was written.
std::string suggest_key(const std::string& key) {
  const std::string leaf = leaf_of(key);
  // 1. A name users bring from HF / other trainers (aliases), or the right name in the wrong section.
  for (const auto& f : fields())
    if (std::find(f.aliases.begin(), f.aliases.end(), leaf) != f.aliases.end()) return "did you mean " + f.key + "?";
  for (const auto& f : fields())
    if (f.leaf() == leaf) return "did you mean " + f.key + "?";
  // 2. Part of a name in the same section (model.hidden -> model.hidden_size).
  if (leaf.size() >= 3) {
    std::vector<std::string> containing;
    for (const auto& f : fields())
      if (f.section() == parent_of(key) && f.leaf().find(leaf) != std::string::npos) containing.push_back(f.key);
    if (!containing.empty() && containing.size() <= 3) {
      std::string alts;
      for (size_t i = 0; i < containing.size(); ++i)
        alts += (i == 0 ? "" : i + 1 == containing.size() ? " or " : ", ") + containing[i];
      return "did you mean " + alts + "?";
    }
  }
  // 3. A typo of any key, section or alias (train.lerning_rate -> train.lr).
  std::vector<std::string> names;
  std::map<std::string, std::string> target;  // name -> key to suggest
  for (const auto& s : sections()) names.push_back(s.name), target[s.name] = s.name;
  for (const auto& f : fields()) {
    names.push_back(f.key), target[f.key] = f.key;
    for (const auto& a : f.aliases) {
      const std::string name = f.section() + "." + a;
      names.push_back(name), target[name] = f.key;
    }
  }
  std::string best = closest(key, names);
  if (best.empty()) {
    // A typo of the leaf alone, in whichever section (long section names would hide it above).
    std::vector<std::string> leaves;
    std::map<std::string, std::string> leaf_target;
    for (const auto& f : fields()) {
      leaves.push_back(f.leaf()), leaf_target.emplace(f.leaf(), f.key);
      for (const auto& a : f.aliases) leaves.push_back(a), leaf_target.emplace(a, f.key);
    }
    const std::string near = closest(leaf, leaves);
    if (!near.empty()) best = leaf_target[near], target[best] = best;
  }
  if (!best.empty()) return "did you mean " + target[best] + "?";
  // 4. Nothing close: list what the section allows.
  const std::string parent = parent_of(key);
  std::string list;
  if (is_section(parent)) {
    for (const auto& f : fields())
      if (f.section() == parent) list += (list.empty() ? "" : ", ") + f.leaf();
    for (const auto& s : sections())
      if (parent_of(s.name) == parent) list += (list.empty() ? "" : ", ") + leaf_of(s.name);
    return "keys in " + parent + ": " + list;
  }
  for (const auto& s : sections())
    if (s.name.find('.') == std::string::npos) list += (list.empty() ? "" : ", ") + s.name;
  return "sections are: " + list;
}

// One setting to apply: a key, its YAML value and where it came from (for messages).
struct Setting {
  const Field* field;
  YAML::Node value;
  std::string where;
};

std::string node_text(const YAML::Node& n) {
  if (n.IsNull()) return "nothing";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a section";
  return "'" + n.Scalar() + "'";
}

std::string example_fix(const Field& f) {
  RunConfig defaults;
  llama_arch_preset("tiny", defaults.model.arch);
  switch (f.kind) {
    case Kind::Enum: return "choose one of them";
    case Kind::Bool: return "write e.g. " + f.leaf() + ": true";
    default: return "write e.g. " + f.leaf() + ": " + format_value(f, defaults);
  }
}

bool parse_int(const std::string& s, int64_t& out) {
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (b != e && *b == '+') ++b;
  auto res = std::from_chars(b, e, out);
  return res.ec == std::errc() && res.ptr == e;
}

bool parse_float(const std::string& s, double& out) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
  char* end = nullptr;
  errno = 0;
  out = std::strtod(s.c_str(), &end);
  return end && *end == '\0' && errno != ERANGE && std::isfinite(out);
}

bool parse_bool(const std::string& s, bool& out) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "true" || l == "yes" || l == "on") return out = true, true;
  if (l == "false" || l == "no" || l == "off") return out = false, true;
  return false;
}

void check_range(const Field& f, double x, const std::string& text, const std::string& where) {
  const bool low = f.lo_open ? x <= f.lo : x < f.lo;
  const bool high = f.hi_open ? x >= f.hi : x > f.hi;
  if (!low && !high) return;
  const auto bound = [&](double v) { return f.kind == Kind::Int ? num(static_cast<int64_t>(v)) : format_double(v); };
  std::string rule;
  if (std::isfinite(f.lo)) rule += (f.lo_open ? "> " : ">= ") + bound(f.lo);
  if (std::isfinite(f.hi)) rule += (rule.empty() ? "" : " and ") + std::string(f.hi_open ? "< " : "<= ") + bound(f.hi);
  fail(where, f.key + ": must be " + rule + ", got " + text, example_fix(f));
}

void apply(RunConfig& cfg, const Setting& s) {
  const Field& f = *s.field;
  const YAML::Node& n = s.value;
  const Ref r = f.ref(cfg);
  if (n.IsNull() && (f.kind == Kind::String)) {  // `from:` with nothing after it means empty
    *std::get<std::string*>(r) = "";
    return;
  }
  if (!n.IsScalar()) fail(s.where, f.key + ": expected " + kind_noun(f) + ", got " + node_text(n), example_fix(f));
  const std::string& text = n.Scalar();
  switch (f.kind) {
    case Kind::Int: {
      int64_t v = 0;
      if (!parse_int(text, v)) fail(s.where, f.key + ": expected an integer, got '" + text + "'", example_fix(f));
      check_range(f, static_cast<double>(v), text, s.where);
      *std::get<int64_t*>(r) = v;
      return;
    }
    case Kind::Float: {
      double v = 0;
      if (!parse_float(text, v)) fail(s.where, f.key + ": expected a number, got '" + text + "'", example_fix(f));
      check_range(f, v, text, s.where);
      *std::get<double*>(r) = v;
      return;
    }
    case Kind::Bool: {
      bool v = false;
      if (!parse_bool(text, v)) fail(s.where, f.key + ": expected true or false, got '" + text + "'", example_fix(f));
      *std::get<bool*>(r) = v;
      return;
    }
    case Kind::Enum: {
      if (std::find(f.choices.begin(), f.choices.end(), text) == f.choices.end()) {
        const std::string near = closest(text, f.choices);
        fail(s.where, f.key + ": expected " + kind_noun(f) + ", got '" + text + "'",
             near.empty() ? "choose one of them" : "did you mean " + near + "?");
      }
      *std::get<std::string*>(r) = text;
      return;
    }
    case Kind::String:
      *std::get<std::string*>(r) = text;
      return;
  }
}

std::string where_at(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1);
}

// Flattens a YAML mapping into settings, rejecting unknown keys, duplicates and misplaced sections.
void collect(const YAML::Node& map, const std::string& prefix, const std::string& source, bool with_lines,
             std::vector<Setting>& out, std::set<std::string>& seen) {
  for (const auto& kv : map) {  // kv owns copies of both nodes (yaml-cpp's iterator yields temporaries)
    const YAML::Node name_node = kv.first;
    const YAML::Node value = kv.second;
    const std::string where = with_lines ? where_at(source, name_node.Mark()) : source;
    if (!name_node.IsScalar()) fail(where, (prefix.empty() ? "top level" : prefix) + ": keys must be plain names", "");
    const std::string name = name_node.Scalar();
    const std::string key = prefix.empty() ? name : prefix + "." + name;
    if (!seen.insert(key).second) fail(where, key + ": set twice", "keep one of the two");
    if (is_section(key)) {
      if (value.IsNull()) continue;  // an empty section: all defaults
      if (!value.IsMap())
        fail(where, key + ": expected a section (indented `key: value` lines), got " + node_text(value),
             "write its keys indented under `" + leaf_of(key) + ":`");
      collect(value, key, source, with_lines, out, seen);
      continue;
    }
    const Field* f = find_field(key);
    if (!f) fail(where, key + ": unknown key", suggest_key(key));
    out.push_back({f, value, with_lines ? where_at(source, value.Mark()) : source});
  }
}

std::vector<Setting> parse_overrides(const std::vector<std::string>& overrides) {
  std::vector<Setting> out;
  for (const auto& o : overrides) {
    const std::string where = "--set " + o;
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) fail(where, "expected key=value", "e.g. --set train.lr=1e-4");
    const std::string key = o.substr(0, eq);
    YAML::Node value;
    try {
      value = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      fail(where, key + ": value is not valid YAML (" + e.msg + ")", "quote it, e.g. --set 'data.path=\"my dir\"'");
    }
    if (is_section(key)) {  // --set 'model.rope_scaling={factor: 8, type: llama3}'
      if (!value.IsMap()) fail(where, key + ": is a section", "set one of its keys, e.g. --set " + key + ".<key>=<value>");
      std::set<std::string> seen;
      collect(value, key, where, false, out, seen);
      continue;
    }
    const Field* f = find_field(key);
    if (!f) fail(where, key + ": unknown key", suggest_key(key));
    out.push_back({f, value, where});
  }
  return out;
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Checks that involve more than one key. Single-key ranges were checked while parsing.
void validate(const RunConfig& c) {
  const std::string& src = c.source;
  const auto& t = c.train;
  const auto& a = c.model.arch;
  if (t.micro_batch > t.global_batch)
    fail(src, "train.micro_batch (" + num(t.micro_batch) + ") is larger than train.global_batch (" + num(t.global_batch) + ")",
         "lower micro_batch or raise global_batch");
  if (t.min_lr > t.lr)
    fail(src, "train.min_lr (" + format_double(t.min_lr) + ") is above train.lr (" + format_double(t.lr) + ")",
         "min_lr is where the schedule decays to: make it <= lr");
  if (a.num_heads % a.num_kv_heads != 0)
    fail(src, "model.num_heads (" + num(a.num_heads) + ") is not a multiple of model.num_kv_heads (" + num(a.num_kv_heads) + ")",
         "each key/value head serves a whole group of query heads");
  if (a.head_dim % 2 != 0) fail(src, "model.head_dim (" + num(a.head_dim) + ") is odd", "RoPE rotates pairs: use an even head_dim");
  if (a.bos_token_id >= a.vocab_size || a.eos_token_id >= a.vocab_size)
    fail(src, "model.bos_token_id / eos_token_id (" + num(a.bos_token_id) + " / " + num(a.eos_token_id) +
                  ") must be below model.vocab_size (" + num(a.vocab_size) + ")", "fix the token ids or the vocabulary size");
  if (a.rope_scaling.type == "llama3" && a.rope_scaling.high_freq_factor <= a.rope_scaling.low_freq_factor)
    fail(src, "model.rope_scaling.high_freq_factor must be larger than low_freq_factor",
         "Llama 3 uses low_freq_factor: 1.0, high_freq_factor: 4.0");
  if (t.seq_len > a.max_position_embeddings)
    fail(src, "train.seq_len (" + num(t.seq_len) + ") exceeds model.max_position_embeddings (" + num(a.max_position_embeddings) + ")",
         "lower seq_len or raise max_position_embeddings");
  if (!is_power_of_two(c.parallel.cp))
    fail(src, "parallel.cp (" + num(c.parallel.cp) + ") is not a power of two", "use 1, 2, 4, 8, ...");
  if (c.parallel.attention == "ffa" && t.device == "cpu")
    fail(src, "parallel.attention: ffa runs on CUDA only, but train.device is cpu",
         "use attention: torch or reference on CPU, or device: cuda");
  if (c.parallel.attention == "ffa" && a.head_dim != 64 && a.head_dim != 128)
    fail(src, "parallel.attention: ffa supports model.head_dim 64 or 128, but head_dim is " + num(a.head_dim),
         "use attention: torch for this model, or a head_dim of 64 or 128");
  if (c.parallel.communicator == "nccl" && t.device == "cpu")
    fail(src, "parallel.communicator: nccl needs CUDA, but train.device is cpu", "use communicator: auto (mpi or tcp) on CPU");
  if (c.data.path.empty() && !c.data.synthetic)
    fail(src, "data.path is empty", "point it at a folder made by `flexcp prepare-data`, or set data.synthetic: true");
  if (c.logging.dir.empty()) fail(src, "logging.dir is empty", "name a run folder, e.g. dir: runs/my-run");
}

RunConfig resolve(const YAML::Node& root, const std::string& source, bool with_lines,
                  const std::vector<std::string>& overrides) {
  std::vector<Setting> settings;
  std::set<std::string> seen;
  if (root.IsDefined() && !root.IsNull()) {
    if (!root.IsMap())
      fail(source, "expected `section:` blocks at the top level, got " + node_text(root), "see configs/tiny.yaml");
    collect(root, "", source, with_lines, settings, seen);
  }
  for (auto& s : parse_overrides(overrides)) settings.push_back(std::move(s));

  RunConfig cfg;
  cfg.source = source;
  // 1. Where the architecture comes from (last writer wins, --set after YAML).
  std::string from_where = source;
  for (const auto& s : settings) {
    if (s.field->key == "model.preset") apply(cfg, s);
    if (s.field->key == "model.from") apply(cfg, s), from_where = s.where;
  }
  if (!cfg.model.from.empty()) {
    try {
      cfg.model.arch = hf_config_read(cfg.model.from);
    } catch (const UserError& e) {  // say which key led there: the reader only knows the JSON file
      throw UserError(from_where + ": model.from: " + e.what());
    }
  } else if (!llama_arch_preset(cfg.model.preset, cfg.model.arch)) {
    fail(source, "model.preset: unknown preset '" + cfg.model.preset + "'",
         std::string("choose one of ") + llama_arch_preset_names());
  }
  // 2. Every explicit key, YAML first, then --set.
  for (const auto& s : settings) apply(cfg, s);
  // 3. Defaults that depend on other keys.
  if (cfg.checkpoint.dir.empty()) cfg.checkpoint.dir = cfg.logging.dir + "/checkpoints";
  validate(cfg);
  return cfg;
}

}  // namespace

RunConfig config_from_string(const std::string& yaml_text, const std::string& source_name,
                             const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    fail(where_at(source_name, e.mark), "not valid YAML: " + e.msg, "check indentation and quoting");
  }
  return resolve(root, source_name, true, overrides);
}

RunConfig config_load(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open the config file", "check the path (configs/ has examples, e.g. configs/tiny.yaml)");
  std::ostringstream text;
  text << in.rdbuf();
  return config_from_string(text.str(), path, overrides);
}

DerivedNumbers config_derive(const RunConfig& cfg, int64_t world_size) {
  const std::string& src = cfg.source;
  const auto& t = cfg.train;
  const int64_t cp = cfg.parallel.cp;
  if (world_size < 1) fail(src, "world size " + num(world_size) + " is not positive", "launch at least one process");
  if (world_size % cp != 0)
    fail(src, "parallel.cp (" + num(cp) + ") does not divide the world size (" + num(world_size) + " processes)",
         "launch a multiple of " + num(cp) + " processes or change parallel.cp");
  if (world_size > 1 && cfg.parallel.communicator == "none")
    fail(src, "parallel.communicator is none but " + num(world_size) + " processes were launched",
         "use communicator: auto, mpi, tcp or nccl");
  DerivedNumbers d;
  d.params = llama_arch_num_params(cfg.model.arch);
  d.world_size = world_size;
  d.dp = world_size / cp;
  if (t.global_batch % (d.dp * t.micro_batch) != 0)
    fail(src, "train.global_batch (" + num(t.global_batch) + ") is not a multiple of dp x micro_batch (" + num(d.dp) + " x " +
                  num(t.micro_batch) + " = " + num(d.dp * t.micro_batch) + ")",
         "make global_batch a multiple of " + num(d.dp * t.micro_batch) + " or change micro_batch");
  if (t.seq_len % cp != 0)
    fail(src, "train.seq_len (" + num(t.seq_len) + ") is not a multiple of parallel.cp (" + num(cp) + ")",
         "each rank holds seq_len / cp tokens: pick a seq_len divisible by cp");
  d.tokens_per_step = t.global_batch * t.seq_len;
  d.grad_accum = t.global_batch / (d.dp * t.micro_batch);
  return d;
}

std::string config_to_yaml(const RunConfig& cfg) {
  std::ostringstream out;
  std::vector<std::string> open;  // section path currently open, e.g. {model, rope_scaling}
  for (const auto& f : fields()) {
    std::vector<std::string> path = split_list([&] {
      std::string s = f.section();
      std::replace(s.begin(), s.end(), '.', ',');
      return s;
    }());
    size_t common = 0;
    while (common < open.size() && common < path.size() && open[common] == path[common]) ++common;
    open.resize(common);
    for (size_t i = common; i < path.size(); ++i) {
      if (i == 0 && out.tellp() > 0) out << "\n";
      out << std::string(2 * i, ' ') << path[i] << ":\n";
      open.push_back(path[i]);
    }
    std::string line = std::string(2 * path.size(), ' ') + f.leaf() + ": " + format_value(f, cfg);
    if (line.size() < 44) line.resize(44, ' ');
    out << line << "  # " << f.doc << "\n";
  }
  return out.str();
}

std::string config_reference_markdown() {
  std::ostringstream md;
  md << "# Configuration reference\n\n"
     << "<!-- Generated by `flexcp config-reference`; edit core/config.cpp, not this file. -->\n\n"
     << "A run is described by one YAML file whose sections and keys are listed below "
     << "(`flexcp train CONFIG`). Keys left out keep their defaults.\n\n"
     << "How a config is resolved, later steps winning:\n\n"
     << "1. the model architecture from `model.preset`, or from the `config.json` of the Hugging Face "
     << "folder `model.from` (paths are relative to the working folder);\n"
     << "2. every key written in the YAML file;\n"
     << "3. every `--set key.path=value` on the command line, in order. The value is read as YAML, "
     << "so `--set train.lr=1e-4`, `--set data.synthetic=true` and "
     << "`--set 'model.rope_scaling={type: none}'` all work.\n\n"
     << "`flexcp train CONFIG --dry-run` prints the resolved config (this same YAML, with every key) and "
     << "the derived numbers (parameters, data-parallel size, tokens per step, gradient-accumulation "
     << "steps) without training; a run saves that YAML as `<logging.dir>/config.yaml`.\n\n"
     << "Mistakes stop the run before anything starts, with one line naming the file, the key and the "
     << "fix, and exit code 2: an unknown key (with a did-you-mean), a value of the wrong type or out of "
     << "range, an unknown choice, or an impossible combination (micro_batch > global_batch, "
     << "warmup > steps, min_lr > lr, num_heads not a multiple of num_kv_heads, cp not a power of two, "
     << "ffa attention on the CPU, seq_len > max_position_embeddings). With the world size known, cp must "
     << "divide it, seq_len must be a multiple of cp and global_batch a multiple of dp x micro_batch, "
     << "where dp = world size / cp.\n";

  std::map<std::string, LlamaArch> presets;
  for (const auto& name : split_list(llama_arch_preset_names())) llama_arch_preset(name, presets[name]);
  RunConfig defaults;
  for (const auto& s : sections()) {
    md << "\n## `" << s.name << "`\n\n" << s.doc << "\n\n";
    md << "| key | type | default | meaning |\n|---|---|---|---|\n";
    for (const auto& f : fields()) {
      if (f.section() != s.name) continue;
      std::string type;
      switch (f.kind) {
        case Kind::Int: type = "integer"; break;
        case Kind::Float: type = "number"; break;
        case Kind::Bool: type = "bool"; break;
        case Kind::String: type = "string"; break;
        case Kind::Enum:
          for (const auto& c : f.choices) type += (type.empty() ? "" : " \\| ") + ("`" + c + "`");
          break;
      }
      if (f.kind == Kind::Int || f.kind == Kind::Float) {
        const auto bound = [&](double v) { return f.kind == Kind::Int ? num(static_cast<int64_t>(v)) : format_double(v); };
        if (std::isfinite(f.lo)) type += std::string(f.lo_open ? " > " : " ≥ ") + bound(f.lo);
        if (std::isfinite(f.hi)) type += std::string(std::isfinite(f.lo) ? ", " : " ") + (f.hi_open ? "< " : "≤ ") + bound(f.hi);
      }
      std::string def;
      if (f.arch) {
        for (const auto& [name, arch] : presets) {
          RunConfig c;
          c.model.arch = arch;
          def += (def.empty() ? "" : "; ") + name + ": `" + format_value(f, c) + "`";
        }
      } else {
        def = "`" + format_value(f, defaults) + "`";
        if (def == "`\"\"`") def = "(empty)";
      }
      md << "| `" << f.key << "` | " << type << " | " << def << " | " << f.doc << " |\n";
    }
  }
  return md.str();
}

}  // namespace flexcp
