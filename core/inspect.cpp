#include "core/inspect.h"

#include <ATen/ATen.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/hf_config.h"
#include "core/llama_arch.h"
#include "core/metrics_compare.h"
#include "core/metrics_log.h"
#include "core/safetensors.h"

namespace flexcp {
namespace {

namespace fs = std::filesystem;

// ---- formatting

std::string with_commas(int64_t n) {
  std::string s = std::to_string(n < 0 ? -n : n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return n < 0 ? "-" + s : s;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024.0 && u < 4) {
    b /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.2f %s" : "%.0f %s", b, units[u]);
  return buf;
}

std::string num(const char* format, double x) {
  if (std::isnan(x)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, x);
  return buf;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

nlohmann::json json_num(double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); }

// Fixed-width columns; the first `left` columns left-aligned, the rest right-aligned.
std::string render_table(const std::vector<std::vector<std::string>>& cells, size_t left) {
  std::vector<size_t> width;
  for (const auto& row : cells) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : cells) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      line += (c ? "  " : "") + (c < left ? row[c] + pad : pad + row[c]);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// ---- files

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot be read", "check that it exists and its permissions");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool has_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// First bytes of a file (fewer when it is shorter).
std::string head_bytes(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::string buf(n, '\0');
  in.read(buf.data(), static_cast<std::streamsize>(n));
  buf.resize(static_cast<size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return buf;
}

int32_t le_int32(const std::string& b, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + static_cast<size_t>(i)]);
  return static_cast<int32_t>(v);
}

constexpr int32_t kMagicLlama3 = 20240801;
constexpr int32_t kMagicGpt2 = 20240520;

bool looks_like_shard(const std::string& path) {
  const std::string h = head_bytes(path, 8);
  if (h.size() < 8) return false;
  const int32_t magic = le_int32(h, 0);
  return magic == kMagicLlama3 || magic == kMagicGpt2;
}

bool looks_like_safetensors(const std::string& path) {
  const std::string h = head_bytes(path, 9);
  return h.size() == 9 && h[8] == '{';
}

bool looks_like_metrics(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return false;
  auto j = nlohmann::json::parse(line, nullptr, false);
  return j.is_object() && j.contains("step");
}

bool is_checkpoint_dir(const fs::path& p) { return has_file(p / "state.json") && has_file(p / "model.safetensors"); }

// ---- tensors

TensorStats stats_of(const at::Tensor& t, int64_t& finite_count) {
  // Chunks in double: exact enough for means of billions of values, and bounded memory for the
  // largest tensors (an embedding of 128K x 2048 would otherwise need a 2 GiB double copy).
  constexpr int64_t kChunk = 1 << 24;
  TensorStats s;
  const at::Tensor flat = t.reshape({-1});
  const int64_t n = flat.numel();
  double sum = 0, sumsq = 0, mn = std::numeric_limits<double>::infinity(), mx = -mn;
  finite_count = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    at::Tensor c = flat.slice(0, start, std::min(n, start + kChunk)).to(at::kDouble);
    const at::Tensor ok = at::isfinite(c);
    const int64_t good = ok.sum().item<int64_t>();
    s.nonfinite += c.numel() - good;
    if (good == 0) continue;
    if (good != c.numel()) c = c.masked_select(ok);
    sum += c.sum().item<double>();
    sumsq += (c * c).sum().item<double>();
    mn = std::min(mn, c.min().item<double>());
    mx = std::max(mx, c.max().item<double>());
    finite_count += good;
  }
  if (finite_count > 0) {
    s.min = mn;
    s.max = mx;
    s.mean = sum / static_cast<double>(finite_count);
    s.std = std::sqrt(std::max(0.0, sumsq / static_cast<double>(finite_count) - s.mean * s.mean));
  } else {
    s.min = s.max = s.mean = s.std = std::numeric_limits<double>::quiet_NaN();
  }
  return s;
}

// Name components that are all digits become '*': "model.layers.3.mlp" -> "model.layers.*.mlp".
std::string layer_pattern(const std::string& name) {
  std::string out, part;
  std::istringstream in(name);
  bool first = true;
  while (std::getline(in, part, '.')) {
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](unsigned char c) { return std::isdigit(c); });
    out += (first ? "" : ".") + (digits ? std::string("*") : part);
    first = false;
  }
  return out;
}

std::string tensor_table(const std::vector<TensorInfo>& rows, bool with_stats, bool with_count) {
  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> head = {"name", "dtype", "shape", "params", "bytes"};
  if (with_count) head.insert(head.begin() + 1, "count");
  if (with_stats) {
    for (const char* h : {"min", "max", "mean", "std", "non-finite"}) head.push_back(h);
  }
  cells.push_back(head);
  for (const auto& t : rows) {
    std::vector<std::string> c = {t.name, t.dtype, shape_text(t.shape), human_count(static_cast<double>(t.numel)),
                                  human_bytes(static_cast<double>(t.bytes))};
    if (with_count) c.insert(c.begin() + 1, "x" + std::to_string(t.count));
    if (with_stats) {
      if (t.has_stats) {
        c.push_back(num("%.4g", t.stats.min));
        c.push_back(num("%.4g", t.stats.max));
        c.push_back(num("%.4g", t.stats.mean));
        c.push_back(num("%.4g", t.stats.std));
        c.push_back(std::to_string(t.stats.nonfinite));
      } else {
        for (int i = 0; i < 5; ++i) c.push_back("-");
      }
    }
    cells.push_back(c);
  }
  // name left, dtype (and count) left, the rest right
  return render_table(cells, with_count ? 3 : 2);
}

nlohmann::json tensor_json(const TensorInfo& t) {
  nlohmann::json j = {{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"numel", t.numel}, {"bytes", t.bytes}};
  if (t.count != 1) j["count"] = t.count;
  if (t.has_stats) {
    j["stats"] = {{"min", json_num(t.stats.min)}, {"max", json_num(t.stats.max)}, {"mean", json_num(t.stats.mean)},
                  {"std", json_num(t.stats.std)}, {"nonfinite", t.stats.nonfinite}};
  }
  return j;
}

std::string safetensors_text(const SafetensorsSummary& s, const InspectOptions& o) {
  std::ostringstream out;
  out << "safetensors: " << s.source;
  if (s.files.size() > 1) out << " (" << s.files.size() << " files)";
  out << "\n";
  if (!s.metadata.empty()) {
    out << "metadata:";
    for (const auto& [k, v] : s.metadata) out << " " << k << "=" << v;
    out << "\n";
  }
  out << "tensors: " << s.num_tensors << ", parameters: " << with_commas(s.num_params) << " ("
      << human_count(static_cast<double>(s.num_params)) << "), bytes: " << human_bytes(static_cast<double>(s.num_bytes));
  for (const auto& [dt, n] : s.params_by_dtype) out << "; " << dt << " " << human_count(static_cast<double>(n));
  out << "\n";
  if (o.stats) out << "non-finite values: " << s.nonfinite << (s.nonfinite ? "  <-- NaN or inf in the weights" : "") << "\n";
  out << "\n" << tensor_table(o.brief ? tensor_rows_grouped(s.tensors) : s.tensors, o.stats, o.brief);
  return out.str();
}

nlohmann::json safetensors_json(const SafetensorsSummary& s, const InspectOptions& o) {
  nlohmann::json j = {{"source", s.source},          {"files", s.files},         {"num_tensors", s.num_tensors},
                      {"num_params", s.num_params},  {"num_bytes", s.num_bytes}, {"params_by_dtype", s.params_by_dtype},
                      {"metadata", s.metadata}};
  if (o.stats) j["nonfinite"] = s.nonfinite;
  j["tensors"] = nlohmann::json::array();
  for (const auto& t : o.brief ? tensor_rows_grouped(s.tensors) : s.tensors) j["tensors"].push_back(tensor_json(t));
  return j;
}

// ---- metrics

std::string metrics_text(const MetricsSummary& m) {
  std::ostringstream out;
  out << "metrics: " << m.path << "\n"
      << "steps: " << m.first_step << ".." << m.last_step << " (" << m.records << " lines";
  if (m.missing_steps) out << ", " << m.missing_steps << " steps missing";
  out << ")\n"
      << "loss: last " << num("%.4f", m.last_loss) << ", lowest " << num("%.4f", m.min_loss) << " at step " << m.min_loss_step;
  if (m.nonfinite_losses) out << "; " << m.nonfinite_losses << " non-finite, first at step " << m.first_nonfinite_step;
  out << "\n";
  if (m.last_val_step) out << "val loss: " << num("%.4f", m.last_val_loss) << " at step " << m.last_val_step << "\n";
  out << "last lr " << num("%.3g", m.last_lr) << ", grad norm " << num("%.3g", m.last_grad_norm) << ", tokens seen "
      << (std::isnan(m.last_tokens) ? "-" : with_commas(static_cast<int64_t>(m.last_tokens))) << "\n"
      << "median tokens/s " << (std::isnan(m.median_tokens_per_s) ? "-" : human_count(m.median_tokens_per_s))
      << ", step " << num("%.1f", m.median_step_ms) << " ms, MFU " << num("%.1f%%", 100 * m.median_mfu)
      << "; peak memory " << num("%.2f", m.max_peak_mem_gib) << " GiB\n";
  for (const auto& n : m.notes) out << "note: " << n << "\n";
  return out.str();
}

nlohmann::json metrics_json(const MetricsSummary& m) {
  return {{"path", m.path},
          {"records", m.records},
          {"first_step", m.first_step},
          {"last_step", m.last_step},
          {"missing_steps", m.missing_steps},
          {"last_loss", json_num(m.last_loss)},
          {"min_loss", json_num(m.min_loss)},
          {"min_loss_step", m.min_loss_step},
          {"nonfinite_losses", m.nonfinite_losses},
          {"last_lr", json_num(m.last_lr)},
          {"last_grad_norm", json_num(m.last_grad_norm)},
          {"last_tokens", json_num(m.last_tokens)},
          {"median_tokens_per_s", json_num(m.median_tokens_per_s)},
          {"median_step_ms", json_num(m.median_step_ms)},
          {"median_mfu", json_num(m.median_mfu)},
          {"max_peak_mem_gib", json_num(m.max_peak_mem_gib)},
          {"last_val_loss", m.last_val_step ? json_num(m.last_val_loss) : nlohmann::json(nullptr)},
          {"last_val_step", m.last_val_step},
          {"notes", m.notes}};
}

// ---- checkpoints and runs

std::string checkpoint_text(const CheckpointSummary& c, const InspectOptions& o) {
  std::ostringstream out;
  out << "checkpoint: " << c.path << "\n" << "step: " << c.step;
  if (c.has_logged_loss) out << " (loss " << num("%.4f", c.logged_loss) << " in the run's metrics.jsonl)";
  out << "\nstate.json: " << c.state.dump() << "\n";
  if (c.has_optimizer) {
    out << "optimizer.safetensors: " << c.optimizer_tensors << " tensors, " << human_bytes(static_cast<double>(c.optimizer_bytes));
    if (!c.model_tensors_without_moments.empty()) {
      out << "; no exp_avg/exp_avg_sq for " << c.model_tensors_without_moments.size() << " model tensor(s), e.g. "
          << c.model_tensors_without_moments.front();
    }
    out << "\n";
  } else {
    out << "optimizer.safetensors: missing (weights only; training cannot resume from here)\n";
  }
  out << "\n" << safetensors_text(c.model, o);
  return out.str();
}

nlohmann::json checkpoint_json(const CheckpointSummary& c, const InspectOptions& o) {
  nlohmann::json j = {{"path", c.path},
                      {"step", c.step},
                      {"state", c.state},
                      {"has_optimizer", c.has_optimizer},
                      {"optimizer_tensors", c.optimizer_tensors},
                      {"optimizer_bytes", c.optimizer_bytes},
                      {"model_tensors_without_moments", c.model_tensors_without_moments},
                      {"model", safetensors_json(c.model, o)}};
  j["logged_loss"] = c.has_logged_loss ? json_num(c.logged_loss) : nlohmann::json(nullptr);
  return j;
}

std::string checkpoints_text(const std::string& dir, const std::vector<CheckpointEntry>& list, const std::string& metrics) {
  std::ostringstream out;
  out << "checkpoints: " << dir << " (" << list.size() << ")\n";
  for (const auto& c : list) {
    double loss = 0;
    out << "  step " << c.step << "  " << c.path;
    if (!metrics.empty() && metrics_loss_at(metrics, c.step, loss)) out << "  (loss " << num("%.4f", loss) << ")";
    out << "\n";
  }
  return out.str();
}

// A few keys of a run's config.yaml, as text, for one summary line. Missing keys are skipped; a
// config that does not parse is reported, not fatal (inspect should still show the metrics).
std::map<std::string, std::string> config_keys(const std::string& path, std::string& problem) {
  std::map<std::string, std::string> out;
  try {
    const YAML::Node root = YAML::LoadFile(path);
    for (const char* key : {"model.preset", "model.from", "data.path", "data.synthetic", "train.steps", "train.seq_len",
                            "train.global_batch", "train.micro_batch", "train.lr", "train.dtype", "parallel.cp",
                            "parallel.attention", "checkpoint.dir"}) {
      const std::string k = key;
      const auto dot = k.find('.');
      const YAML::Node section = root[k.substr(0, dot)];
      if (!section || !section.IsMap()) continue;
      const YAML::Node v = section[k.substr(dot + 1)];
      if (v && v.IsScalar() && !v.Scalar().empty()) out[k] = v.Scalar();
    }
  } catch (const YAML::Exception& e) {
    problem = path + ": not readable as YAML (" + std::string(e.what()) + ")";
  }
  return out;
}

std::string run_text(const RunSummary& r) {
  std::ostringstream out;
  out << "run: " << r.path << "\n";
  if (r.has_config) {
    out << "config.yaml:";
    for (const auto& [k, v] : r.config) out << " " << k << "=" << v;
    out << "\n";
  } else {
    out << "config.yaml: missing\n";
  }
  out << metrics_text(r.metrics);
  if (r.checkpoints.empty()) {
    out << "checkpoints: none\n";
  } else {
    out << "checkpoints: " << r.checkpoints.size() << ", newest step " << r.checkpoints.back().step << " ("
        << r.checkpoints.back().path << ")\n";
  }
  return out.str();
}

nlohmann::json checkpoints_json(const std::vector<CheckpointEntry>& list) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& c : list) j.push_back({{"step", c.step}, {"path", c.path}});
  return j;
}

}  // namespace

// Defined in core/inspect_data.cpp (token shards and data sets).
std::string inspect_shard_text(const ShardSummary& s);
nlohmann::json inspect_shard_json(const ShardSummary& s);
std::string inspect_dataset_text(const DatasetSummary& d);
nlohmann::json inspect_dataset_json(const DatasetSummary& d);

const char* inspect_kind_name(InspectKind kind) {
  switch (kind) {
    case InspectKind::safetensors: return "safetensors";
    case InspectKind::model_folder: return "model_folder";
    case InspectKind::checkpoint: return "checkpoint";
    case InspectKind::checkpoints_folder: return "checkpoints_folder";
    case InspectKind::run_folder: return "run";
    case InspectKind::metrics: return "metrics";
    case InspectKind::shard: return "shard";
    case InspectKind::dataset: return "dataset";
  }
  return "?";
}

InspectKind inspect_detect(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  const std::string fix = "inspect takes a .safetensors file, an HF model folder, a checkpoint or run folder, "
                          "a metrics.jsonl, a token shard (.bin) or a data set folder";
  if (fs::is_directory(p, ec)) {
    if (is_checkpoint_dir(p)) return InspectKind::checkpoint;
    if (has_file(p / "manifest.json")) return InspectKind::dataset;
    if (has_file(p / "metrics.jsonl")) return InspectKind::run_folder;
    if (has_file(p / "model.safetensors.index.json") || has_file(p / "model.safetensors")) return InspectKind::model_folder;
    if (!inspect_list_checkpoints(path).empty()) return InspectKind::checkpoints_folder;
    fail(path, "this folder holds nothing inspect knows (no metrics.jsonl, state.json, manifest.json or model.safetensors)", fix);
  }
  if (!fs::exists(p, ec)) fail(path, "no such file or folder", fix);
  const std::string name = p.filename().string();
  if (name == "state.json" && is_checkpoint_dir(p.parent_path())) return InspectKind::checkpoint;
  if (name == "manifest.json") return InspectKind::dataset;
  if (ends_with(name, ".safetensors.index.json")) return InspectKind::model_folder;
  if (ends_with(name, ".safetensors") || looks_like_safetensors(path)) return InspectKind::safetensors;
  if (looks_like_shard(path)) return InspectKind::shard;
  if (ends_with(name, ".jsonl") || looks_like_metrics(path)) return InspectKind::metrics;
  if (ends_with(name, ".bin")) fail(path, "not a token shard: its header has neither llm.c magic (20240801, 20240520)", fix);
  fail(path, "not a file inspect knows", fix);
}

bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i])), db = std::isdigit(static_cast<unsigned char>(b[j]));
    if (da && db) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      // Compare digit runs by value: strip leading zeros, then length, then digits.
      size_t is = i, js = j;
      while (is + 1 < ie && a[is] == '0') ++is;
      while (js + 1 < je && b[js] == '0') ++js;
      if (ie - is != je - js) return ie - is < je - js;
      const int c = a.compare(is, ie - is, b, js, je - js);
      if (c != 0) return c < 0;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::vector<TensorInfo> tensor_rows_grouped(const std::vector<TensorInfo>& rows) {
  struct Acc {
    TensorInfo row;
    double n = 0, sum = 0, sumsq = 0;  // pooled moments over the finite values
    bool all_stats = true;
  };
  std::vector<Acc> groups;
  std::map<std::string, size_t> index;
  for (const auto& t : rows) {
    const std::string key = layer_pattern(t.name) + "|" + t.dtype + "|" + shape_text(t.shape);
    auto it = index.find(key);
    const double n = static_cast<double>(t.numel - (t.has_stats ? t.stats.nonfinite : 0));
    if (it == index.end()) {
      index[key] = groups.size();
      Acc a;
      a.row = t;
      a.row.name = layer_pattern(t.name);
      a.row.count = 0;
      a.row.numel = 0;
      a.row.bytes = 0;
      a.row.stats = {};
      a.row.stats.min = std::numeric_limits<double>::infinity();
      a.row.stats.max = -std::numeric_limits<double>::infinity();
      groups.push_back(a);
      it = index.find(key);
    }
    Acc& g = groups[it->second];
    g.row.count += t.count;
    g.row.numel += t.numel;
    g.row.bytes += t.bytes;
    g.all_stats = g.all_stats && t.has_stats;
    if (t.has_stats) {
      g.row.stats.nonfinite += t.stats.nonfinite;
      if (n > 0) {
        g.row.stats.min = std::min(g.row.stats.min, t.stats.min);
        g.row.stats.max = std::max(g.row.stats.max, t.stats.max);
        g.n += n;
        g.sum += n * t.stats.mean;
        g.sumsq += n * (t.stats.std * t.stats.std + t.stats.mean * t.stats.mean);
      }
    }
  }
  std::vector<TensorInfo> out;
  for (auto& g : groups) {
    g.row.has_stats = g.all_stats;
    if (g.all_stats) {
      if (g.n > 0) {
        g.row.stats.mean = g.sum / g.n;
        g.row.stats.std = std::sqrt(std::max(0.0, g.sumsq / g.n - g.row.stats.mean * g.row.stats.mean));
      } else {
        g.row.stats.min = g.row.stats.max = g.row.stats.mean = g.row.stats.std = std::numeric_limits<double>::quiet_NaN();
      }
    }
    out.push_back(g.row);
  }
  return out;
}

SafetensorsSummary inspect_safetensors(const std::string& path, const InspectOptions& options) {
  const SafetensorsSet set = SafetensorsSet::open(path);
  SafetensorsSummary s;
  s.source = path;
  std::vector<std::string> names = set.names();
  std::sort(names.begin(), names.end(), natural_less);
  std::set<std::string> files;
  for (const auto& name : names) {
    const SafetensorsEntry& e = set.entry(name);
    TensorInfo t;
    t.name = name;
    t.dtype = e.dtype_name;
    t.shape = e.shape;
    t.numel = 1;
    for (int64_t d : e.shape) t.numel *= d;
    t.bytes = e.nbytes();
    if (options.stats) {
      int64_t finite_count = 0;
      t.stats = stats_of(set.view(name), finite_count);
      t.has_stats = true;
      s.nonfinite += t.stats.nonfinite;
    }
    const SafetensorsFile& f = set.file_of(name);
    if (files.insert(f.path()).second && s.metadata.empty()) s.metadata = f.metadata();
    s.num_params += t.numel;
    s.num_bytes += t.bytes;
    s.params_by_dtype[t.dtype] += t.numel;
    s.tensors.push_back(std::move(t));
  }
  s.files.assign(files.begin(), files.end());
  std::sort(s.files.begin(), s.files.end(), natural_less);
  s.num_tensors = static_cast<int64_t>(s.tensors.size());
  return s;
}

MetricsSummary inspect_metrics(const std::string& path) {
  const MetricsRun run = metrics_load(path);
  MetricsSummary m;
  m.path = run.path;
  m.notes = run.notes;
  m.records = static_cast<int64_t>(run.records.size());
  m.first_step = run.records.front().step;
  m.last_step = run.records.back().step;
  m.missing_steps = (m.last_step - m.first_step + 1) - m.records;
  m.last_loss = m.min_loss = m.last_lr = m.last_grad_norm = m.last_tokens = m.last_val_loss = kNoValue;
  std::vector<double> tps, ms, mfu;
  m.max_peak_mem_gib = kNoValue;
  for (const auto& r : run.records) {
    if (r.has_loss) {
      m.last_loss = r.loss;
      if (!std::isfinite(r.loss)) {
        if (m.nonfinite_losses++ == 0) m.first_nonfinite_step = r.step;
      } else if (std::isnan(m.min_loss) || r.loss < m.min_loss) {
        m.min_loss = r.loss;
        m.min_loss_step = r.step;
      }
    }
    if (!std::isnan(r.lr)) m.last_lr = r.lr;
    if (!std::isnan(r.grad_norm)) m.last_grad_norm = r.grad_norm;
    if (!std::isnan(r.tokens)) m.last_tokens = r.tokens;
    if (!std::isnan(r.val_loss)) {
      m.last_val_loss = r.val_loss;
      m.last_val_step = r.step;
    }
    if (std::isfinite(r.peak_mem_gib) && !(r.peak_mem_gib <= m.max_peak_mem_gib)) m.max_peak_mem_gib = r.peak_mem_gib;
    tps.push_back(r.tokens_per_s);
    ms.push_back(r.step_ms);
    mfu.push_back(r.mfu);
  }
  m.median_tokens_per_s = median_finite(tps);
  m.median_step_ms = median_finite(ms);
  m.median_mfu = median_finite(mfu);
  return m;
}

bool metrics_loss_at(const std::string& metrics_path, int64_t step, double& loss) {
  if (!has_file(metrics_path)) return false;
  try {
    const MetricsRun run = metrics_load(metrics_path);
    for (const auto& r : run.records) {
      if (r.step == step && r.has_loss) {
        loss = r.loss;
        return true;
      }
    }
  } catch (const UserError&) {
    // A malformed metrics file does not make the checkpoint unreadable: just no loss to show.
  }
  return false;
}

CheckpointSummary inspect_checkpoint(const std::string& path, const InspectOptions& options) {
  fs::path dir(path);
  if (dir.filename() == "state.json") dir = dir.parent_path();
  CheckpointSummary c;
  c.path = dir.string();
  const std::string state_path = (dir / "state.json").string();
  try {
    c.state = nlohmann::json::parse(read_text(state_path));
  } catch (const nlohmann::json::exception& e) {
    fail(state_path, "not valid JSON", "the checkpoint is damaged; use an older one");
  }
  if (!c.state.is_object() || !c.state.contains("step") || !c.state["step"].is_number_integer()) {
    fail(state_path, "\"step\" is missing or not an integer", "the checkpoint is damaged; use an older one");
  }
  c.step = c.state["step"].get<int64_t>();
  c.model = inspect_safetensors((dir / "model.safetensors").string(), options);
  const fs::path opt = dir / "optimizer.safetensors";
  if (has_file(opt)) {
    c.has_optimizer = true;
    const auto f = SafetensorsFile::open(opt.string());
    const auto names = f->names();
    c.optimizer_tensors = static_cast<int64_t>(names.size());
    for (const auto& n : names) c.optimizer_bytes += f->entry(n).nbytes();
    for (const auto& t : c.model.tensors) {
      if (!f->contains("exp_avg." + t.name) || !f->contains("exp_avg_sq." + t.name)) {
        c.model_tensors_without_moments.push_back(t.name);
      }
    }
  }
  // <run>/checkpoints/step_N -> <run>/metrics.jsonl, when the checkpoint lives in its run folder.
  const fs::path metrics = fs::absolute(dir).lexically_normal().parent_path().parent_path() / "metrics.jsonl";
  c.has_logged_loss = metrics_loss_at(metrics.string(), c.step, c.logged_loss);
  return c;
}

std::vector<CheckpointEntry> inspect_list_checkpoints(const std::string& dir) {
  std::vector<CheckpointEntry> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0 || !has_file(e.path() / "state.json")) continue;
    const std::string digits = name.substr(5);
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](unsigned char ch) { return std::isdigit(ch); })) continue;
    out.push_back({e.path().string(), std::stoll(digits)});
  }
  std::sort(out.begin(), out.end(), [](const CheckpointEntry& a, const CheckpointEntry& b) { return a.step < b.step; });
  return out;
}

RunSummary inspect_run(const std::string& path) {
  RunSummary r;
  r.path = path;
  const fs::path dir(path);
  r.metrics = inspect_metrics((dir / "metrics.jsonl").string());
  fs::path ckpt = dir / "checkpoints";
  if (has_file(dir / "config.yaml")) {
    r.has_config = true;
    std::string problem;
    r.config = config_keys((dir / "config.yaml").string(), problem);
    if (!problem.empty()) r.metrics.notes.push_back(problem);
    auto it = r.config.find("checkpoint.dir");
    if (it != r.config.end() && fs::is_directory(it->second)) ckpt = it->second;  // relative to where the run started
  }
  r.checkpoints = inspect_list_checkpoints(ckpt.string());
  return r;
}

std::string inspect_text(const std::string& path, const InspectOptions& options) {
  switch (inspect_detect(path)) {
    case InspectKind::safetensors:
      return safetensors_text(inspect_safetensors(path, options), options);
    case InspectKind::model_folder: {
      std::string out;
      const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
      const SafetensorsSummary s = inspect_safetensors(path, options);
      if (has_file(dir / "config.json")) {
        try {
          const LlamaArch a = hf_config_read((dir / "config.json").string());
          const int64_t expect = llama_arch_num_params(a);
          out += "config.json: Llama, " + std::to_string(a.num_layers) + " layers, hidden " + std::to_string(a.hidden_size) +
                 ", heads " + std::to_string(a.num_heads) + "/" + std::to_string(a.num_kv_heads) + " x " +
                 std::to_string(a.head_dim) + ", vocab " + std::to_string(a.vocab_size) +
                 (a.tie_embeddings ? ", tied embeddings" : "") + "; " + with_commas(expect) + " parameters " +
                 (expect == s.num_params ? "(matches the tensors)" : "(the tensors hold " + with_commas(s.num_params) + ")") + "\n";
        } catch (const UserError& e) {
          out += std::string("config.json: ") + e.what() + "\n";
        }
      }
      return out + safetensors_text(s, options);
    }
    case InspectKind::checkpoint:
      return checkpoint_text(inspect_checkpoint(path, options), options);
    case InspectKind::checkpoints_folder: {
      const fs::path metrics = fs::absolute(path).lexically_normal().parent_path() / "metrics.jsonl";
      return checkpoints_text(path, inspect_list_checkpoints(path), metrics.string());
    }
    case InspectKind::run_folder:
      return run_text(inspect_run(path));
    case InspectKind::metrics:
      return metrics_text(inspect_metrics(path));
    case InspectKind::shard:
      return inspect_shard_text(inspect_shard(path));
    case InspectKind::dataset:
      return inspect_dataset_text(inspect_dataset(fs::is_directory(path) ? path : fs::path(path).parent_path().string()));
  }
  return {};
}

nlohmann::json inspect_json(const std::string& path, const InspectOptions& options) {
  const InspectKind kind = inspect_detect(path);
  nlohmann::json j;
  switch (kind) {
    case InspectKind::safetensors:
    case InspectKind::model_folder:
      j = safetensors_json(inspect_safetensors(path, options), options);
      break;
    case InspectKind::checkpoint:
      j = checkpoint_json(inspect_checkpoint(path, options), options);
      break;
    case InspectKind::checkpoints_folder:
      j = {{"path", path}, {"checkpoints", checkpoints_json(inspect_list_checkpoints(path))}};
      break;
    case InspectKind::run_folder: {
      const RunSummary r = inspect_run(path);
      j = {{"path", r.path}, {"config", r.config}, {"metrics", metrics_json(r.metrics)},
           {"checkpoints", checkpoints_json(r.checkpoints)}};
      break;
    }
    case InspectKind::metrics:
      j = metrics_json(inspect_metrics(path));
      break;
    case InspectKind::shard:
      j = inspect_shard_json(inspect_shard(path));
      break;
    case InspectKind::dataset:
      j = inspect_dataset_json(inspect_dataset(fs::is_directory(path) ? path : fs::path(path).parent_path().string()));
      break;
  }
  j["kind"] = inspect_kind_name(kind);
  return j;
}

}  // namespace flexcp
