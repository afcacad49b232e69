// `flexcp inspect` (core/inspect.*, core/inspect_data.cpp): safetensors files written byte by byte here
// (independently of core/safetensors), sharded folders, checkpoints, run folders, metrics, token shards
// and data sets, plus the command line.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/errors.h"
#include "core/inspect.h"
#include "core/token_shards.h"
#include "test/test_util.h"

namespace fs = std::filesystem;
using namespace flexcp;
using namespace flexcp::test;

namespace {

// A tensor for the hand-written safetensors files: raw little-endian bytes and what they hold.
struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
  std::vector<double> values;  // for the reference statistics
};

RawTensor f32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  RawTensor t{name, "F32", std::move(shape), std::string(v.size() * 4, '\0'), {}};
  std::memcpy(t.bytes.data(), v.data(), v.size() * 4);
  for (float x : v) t.values.push_back(x);
  return t;
}

// bf16 = the top 16 bits of an f32; exact for the values used here.
RawTensor bf16(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  RawTensor t{name, "BF16", std::move(shape), {}, {}};
  for (float x : v) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const uint16_t h = static_cast<uint16_t>(bits >> 16);
    t.bytes.push_back(static_cast<char>(h & 0xff));
    t.bytes.push_back(static_cast<char>(h >> 8));
    t.values.push_back(x);
  }
  return t;
}

RawTensor i64(const std::string& name, const std::vector<int64_t>& v) {
  RawTensor t{name, "I64", {static_cast<int64_t>(v.size())}, std::string(v.size() * 8, '\0'), {}};
  std::memcpy(t.bytes.data(), v.data(), v.size() * 8);
  for (int64_t x : v) t.values.push_back(static_cast<double>(x));
  return t;
}

// The safetensors layout, written here from the format description rather than with our writer.
void write_safetensors(const fs::path& p, const std::vector<RawTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  std::string out(8, '\0');
  const uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  write_text(p, out + h + data);
}

// Statistics over the finite values, straight from the definition (population std).
TensorStats reference_stats(const std::vector<double>& v) {
  TensorStats s;
  double sum = 0, n = 0;
  s.min = INFINITY;
  s.max = -INFINITY;
  for (double x : v) {
    if (!std::isfinite(x)) {
      ++s.nonfinite;
      continue;
    }
    sum += x;
    ++n;
    s.min = std::min(s.min, x);
    s.max = std::max(s.max, x);
  }
  s.mean = sum / n;
  double ss = 0;
  for (double x : v) {
    if (std::isfinite(x)) ss += (x - s.mean) * (x - s.mean);
  }
  s.std = std::sqrt(ss / n);
  return s;
}

void check_stats(const TensorInfo& t, const TensorStats& want) {
  INFO(t.name);
  REQUIRE(t.has_stats);
  CHECK(t.stats.min == Approx(want.min));
  CHECK(t.stats.max == Approx(want.max));
  CHECK(t.stats.mean == Approx(want.mean).margin(1e-12));
  CHECK(t.stats.std == Approx(want.std));
  CHECK(t.stats.nonfinite == want.nonfinite);
}

const TensorInfo& row_named(const std::vector<TensorInfo>& rows, const std::string& name) {
  for (const auto& r : rows) {
    if (r.name == name) return r;
  }
  FAIL("no row " << name);
  return rows.front();
}

std::vector<float> ramp(int n, float scale, float offset) {
  std::vector<float> v;
  for (int i = 0; i < n; ++i) v.push_back(scale * static_cast<float>((i * 7) % 13) + offset);
  return v;
}

// A small model's tensors: 12 layers so that names sort naturally (layers.2 before layers.10).
std::vector<RawTensor> small_model() {
  std::vector<RawTensor> t;
  t.push_back(f32("model.embed_tokens.weight", {10, 4}, ramp(40, 0.1f, -0.5f)));
  for (int l = 0; l < 12; ++l) {
    t.push_back(f32("model.layers." + std::to_string(l) + ".mlp.up_proj.weight", {3, 4}, ramp(12, 0.01f * (l + 1), 0.1f * l)));
    t.push_back(bf16("model.layers." + std::to_string(l) + ".input_layernorm.weight", {4}, {1.0f, 1.5f, -2.0f, 0.25f}));
  }
  t.push_back(f32("model.norm.weight", {4}, {1, 1, 1, 1}));
  return t;
}

std::string metrics_line(int64_t step, double loss, double extra_val = NAN) {
  nlohmann::json j = {{"step", step}, {"loss", loss}, {"lr", 1e-3 / step}, {"grad_norm", 0.5}, {"tokens", step * 1024},
                      {"tokens_per_s", 1000.0 * step}, {"step_ms", 10.0 + step}, {"mfu", 0.01 * step}, {"peak_mem_gib", 2.0 + step}};
  if (!std::isnan(extra_val)) j["val_loss"] = extra_val;
  return j.dump() + "\n";
}

// A shard in llm.c's layout, by hand: 256 int32 header, then tokens of `token_bytes` each.
void write_shard(const fs::path& p, int32_t magic, int32_t version, const std::vector<uint32_t>& tokens, int token_bytes) {
  std::string out(1024, '\0');
  int32_t header[3] = {magic, version, static_cast<int32_t>(tokens.size())};
  std::memcpy(out.data(), header, sizeof header);
  for (uint32_t t : tokens) {
    for (int b = 0; b < token_bytes; ++b) out.push_back(static_cast<char>((t >> (8 * b)) & 0xff));
  }
  write_text(p, out);
}

}  // namespace

TEST_CASE("natural_less orders numbered names by value", "[inspect]") {
  CHECK(natural_less("model.layers.2.x", "model.layers.10.x"));
  CHECK_FALSE(natural_less("model.layers.10.x", "model.layers.2.x"));
  CHECK(natural_less("a.9", "a.10"));
  CHECK(natural_less("a.1.b", "a.1.c"));
  CHECK(natural_less("a", "a.0"));
  CHECK_FALSE(natural_less("a.5", "a.5"));
  CHECK(natural_less("step_007", "step_10"));
  std::vector<std::string> v = {"l.10", "l.1", "l.2", "l.0", "k"};
  std::sort(v.begin(), v.end(), natural_less);
  CHECK(v == std::vector<std::string>{"k", "l.0", "l.1", "l.2", "l.10"});
}

TEST_CASE("inspect_safetensors gives the tensor table with totals per dtype and metadata and statistics", "[inspect]") {
  TempDir tmp;
  const fs::path file = tmp.path / "m.safetensors";
  auto tensors = small_model();
  tensors.push_back(f32("weird", {2, 3}, {1.0f, NAN, 3.0f, INFINITY, -5.0f, 0.5f}));
  tensors.push_back(i64("position_ids", {0, 1, 2, 3, 4}));
  write_safetensors(file, tensors, {{"format", "pt"}, {"note", "hand-written"}});

  InspectOptions o;
  o.stats = true;
  const SafetensorsSummary s = inspect_safetensors(file.string(), o);
  CHECK(s.files == std::vector<std::string>{file.string()});
  CHECK(s.metadata.at("note") == "hand-written");
  REQUIRE(s.num_tensors == static_cast<int64_t>(tensors.size()));
  int64_t params = 0, f32_params = 0, bytes = 0;
  for (const auto& t : tensors) {
    params += static_cast<int64_t>(t.values.size());
    bytes += static_cast<int64_t>(t.bytes.size());
    if (t.dtype == "F32") f32_params += static_cast<int64_t>(t.values.size());
  }
  CHECK(s.num_params == params);
  CHECK(s.num_bytes == static_cast<uint64_t>(bytes));
  CHECK(s.params_by_dtype.at("F32") == f32_params);
  CHECK(s.params_by_dtype.at("BF16") == 12 * 4);
  CHECK(s.params_by_dtype.at("I64") == 5);
  CHECK(s.nonfinite == 2);
  // Natural order: layers.2 before layers.10, and names outside the layers in place.
  std::vector<std::string> names;
  for (const auto& t : s.tensors) names.push_back(t.name);
  CHECK(names.front() == "model.embed_tokens.weight");
  const auto pos = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) - names.begin(); };
  CHECK(pos("model.layers.2.mlp.up_proj.weight") < pos("model.layers.10.mlp.up_proj.weight"));
  CHECK(pos("model.layers.11.mlp.up_proj.weight") < pos("model.norm.weight"));
  for (const auto& t : tensors) {
    const TensorInfo& r = row_named(s.tensors, t.name);
    CHECK(r.dtype == t.dtype);
    CHECK(r.shape == t.shape);
    CHECK(r.numel == static_cast<int64_t>(t.values.size()));
    CHECK(r.bytes == t.bytes.size());
    check_stats(r, reference_stats(t.values));
  }
  // Without --stats nothing is read.
  const SafetensorsSummary plain = inspect_safetensors(file.string(), {});
  CHECK_FALSE(plain.tensors[0].has_stats);

  const std::string text = inspect_text(file.string(), o);
  CHECK(text.find("tensors: " + std::to_string(tensors.size())) != std::string::npos);
  CHECK(text.find("non-finite values: 2") != std::string::npos);
  CHECK(text.find("model.layers.10.mlp.up_proj.weight") != std::string::npos);
  CHECK(inspect_json(file.string(), {})["kind"] == "safetensors");
}

TEST_CASE("brief tables group layers into one row per pattern with pooled statistics", "[inspect]") {
  TempDir tmp;
  const auto tensors = small_model();
  write_safetensors(tmp.path / "m.safetensors", tensors);
  InspectOptions o;
  o.stats = true;
  const auto s = inspect_safetensors((tmp.path / "m.safetensors").string(), o);
  const auto rows = tensor_rows_grouped(s.tensors);
  REQUIRE(rows.size() == 4);  // embed, layers.*.mlp.up_proj, layers.*.input_layernorm, norm
  const TensorInfo& up = row_named(rows, "model.layers.*.mlp.up_proj.weight");
  CHECK(up.count == 12);
  CHECK(up.numel == 12 * 12);
  CHECK(up.bytes == 12u * 12u * 4u);
  std::vector<double> all;
  for (const auto& t : tensors) {
    if (t.name.find("up_proj") != std::string::npos) all.insert(all.end(), t.values.begin(), t.values.end());
  }
  check_stats(up, reference_stats(all));
  CHECK(row_named(rows, "model.layers.*.input_layernorm.weight").dtype == "BF16");
  CHECK(row_named(rows, "model.embed_tokens.weight").count == 1);
  o.brief = true;
  const std::string text = inspect_text((tmp.path / "m.safetensors").string(), o);
  CHECK(text.find("model.layers.*.mlp.up_proj.weight") != std::string::npos);
  CHECK(text.find("x12") != std::string::npos);
  CHECK(text.find("model.layers.3.") == std::string::npos);
}

TEST_CASE("inspect reads sharded HF folders through their index and checks config.json", "[inspect]") {
  TempDir tmp;
  const auto tensors = small_model();
  const std::vector<RawTensor> a(tensors.begin(), tensors.begin() + 10), b(tensors.begin() + 10, tensors.end());
  write_safetensors(tmp.path / "model-00001-of-00002.safetensors", a);
  write_safetensors(tmp.path / "model-00002-of-00002.safetensors", b);
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (const auto& t : a) index["weight_map"][t.name] = "model-00001-of-00002.safetensors";
  for (const auto& t : b) index["weight_map"][t.name] = "model-00002-of-00002.safetensors";
  write_text(tmp.path / "model.safetensors.index.json", index.dump());
  CHECK(inspect_detect(tmp.path.string()) == InspectKind::model_folder);
  const auto s = inspect_safetensors(tmp.path.string(), {});
  CHECK(s.files.size() == 2);
  CHECK(s.num_tensors == static_cast<int64_t>(tensors.size()));
  CHECK(inspect_detect((tmp.path / "model.safetensors.index.json").string()) == InspectKind::model_folder);

  // A config.json whose architecture does not match the tensors is reported, not fatal.
  write_text(tmp.path / "config.json",
              R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 4,
                  "intermediate_size": 3, "num_hidden_layers": 12, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": true, "rope_scaling": null})");
  const std::string text = inspect_text(tmp.path.string(), {});
  CHECK(text.find("config.json: Llama, 12 layers") != std::string::npos);
  CHECK(text.find("(the tensors hold") != std::string::npos);  // attention and MLP tensors are missing here
}

TEST_CASE("inspect summarizes checkpoints and checkpoint folders and run folders", "[inspect]") {
  TempDir tmp;
  const fs::path run = tmp.path / "run";
  const fs::path ckpts = run / "checkpoints";
  const auto model = small_model();
  for (int step : {10, 5}) {
    char name[32];
    std::snprintf(name, sizeof(name), "step_%08d", step);
    const fs::path dir = ckpts / name;
    write_safetensors(dir / "model.safetensors", model);
    std::vector<RawTensor> opt;
    for (const auto& t : model) {
      if (t.name == "model.norm.weight") continue;  // one tensor without moments
      opt.push_back(f32("exp_avg." + t.name, t.shape, std::vector<float>(t.values.size(), 0.0f)));
      opt.push_back(f32("exp_avg_sq." + t.name, t.shape, std::vector<float>(t.values.size(), 0.0f)));
    }
    write_safetensors(dir / "optimizer.safetensors", opt);
    write_text(dir / "state.json", nlohmann::json({{"step", step}, {"config_hash", "abc"}}).dump());
  }
  fs::create_directories(ckpts / "step_00000015.tmp-123");  // a crash leftover: not a checkpoint
  write_text(ckpts / "step_00000020" / "model.safetensors", "");  // no state.json: not a checkpoint
  std::string metrics;
  for (int s = 1; s <= 12; ++s) metrics += metrics_line(s, 5.0 - 0.1 * s, s == 10 ? 4.2 : NAN);
  write_text(run / "metrics.jsonl", metrics);
  write_text(run / "config.yaml", "model:\n  preset: tiny\ntrain:\n  steps: 12\n  seq_len: 256\nparallel:\n  cp: 2\n");

  const fs::path ck10 = ckpts / "step_00000010";
  CHECK(inspect_detect(ck10.string()) == InspectKind::checkpoint);
  CHECK(inspect_detect((ck10 / "state.json").string()) == InspectKind::checkpoint);
  CHECK(inspect_detect(ckpts.string()) == InspectKind::checkpoints_folder);
  CHECK(inspect_detect(run.string()) == InspectKind::run_folder);

  const CheckpointSummary c = inspect_checkpoint(ck10.string(), {});
  CHECK(c.step == 10);
  CHECK(c.state["config_hash"] == "abc");
  CHECK(c.model.num_tensors == static_cast<int64_t>(model.size()));
  CHECK(c.has_optimizer);
  CHECK(c.optimizer_tensors == 2 * (static_cast<int64_t>(model.size()) - 1));
  CHECK(c.model_tensors_without_moments == std::vector<std::string>{"model.norm.weight"});
  REQUIRE(c.has_logged_loss);
  CHECK(c.logged_loss == Approx(4.0));

  const auto list = inspect_list_checkpoints(ckpts.string());
  REQUIRE(list.size() == 2);
  CHECK(list[0].step == 5);
  CHECK(list[1].step == 10);

  const RunSummary r = inspect_run(run.string());
  CHECK(r.has_config);
  CHECK(r.config.at("model.preset") == "tiny");
  CHECK(r.config.at("parallel.cp") == "2");
  CHECK(r.checkpoints.size() == 2);
  CHECK(r.metrics.last_step == 12);

  const std::string text = inspect_text(run.string(), {});
  CHECK(text.find("newest step 10") != std::string::npos);
  CHECK(text.find("parallel.cp=2") != std::string::npos);
  const std::string ctext = inspect_text(ck10.string(), {});
  CHECK(ctext.find("step: 10 (loss 4.0000") != std::string::npos);
  CHECK(ctext.find("no exp_avg/exp_avg_sq for 1 model tensor(s), e.g. model.norm.weight") != std::string::npos);
  CHECK(inspect_text(ckpts.string(), {}).find("step 5") != std::string::npos);
  CHECK(inspect_json(run.string(), {})["metrics"]["last_val_loss"] == 4.2);

  // A damaged state.json names the file.
  write_text(ckpts / "step_00000005" / "state.json", "{\"step\": \"five\"}");
  const std::string msg = user_error_of([&] { inspect_checkpoint((ckpts / "step_00000005").string(), {}); });
  CHECK(msg.find("state.json") != std::string::npos);
  CHECK(msg.find("step") != std::string::npos);
}

TEST_CASE("inspect_metrics reports steps and gaps and best and last loss and speed medians and validation", "[inspect]") {
  TempDir tmp;
  std::string text;
  for (int s : {1, 2, 3, 5, 6}) text += metrics_line(s, s == 3 ? 1.5 : 4.0 - 0.1 * s, s == 5 ? 3.3 : NAN);
  text += "{\"step\": 7, \"loss\": null}\n";
  write_text(tmp.path / "m.jsonl", text);
  const MetricsSummary m = inspect_metrics((tmp.path / "m.jsonl").string());
  CHECK(m.records == 6);
  CHECK(m.first_step == 1);
  CHECK(m.last_step == 7);
  CHECK(m.missing_steps == 1);  // step 4
  CHECK(std::isnan(m.last_loss));
  CHECK(m.nonfinite_losses == 1);
  CHECK(m.first_nonfinite_step == 7);
  CHECK(m.min_loss == 1.5);
  CHECK(m.min_loss_step == 3);
  CHECK(m.last_val_loss == 3.3);
  CHECK(m.last_val_step == 5);
  CHECK(m.last_lr == Approx(1e-3 / 6));
  CHECK(m.last_tokens == 6 * 1024);
  CHECK(m.median_tokens_per_s == 3000.0);  // of 1000, 2000, 3000, 5000, 6000
  CHECK(m.median_step_ms == 13.0);
  CHECK(m.max_peak_mem_gib == 8.0);
  CHECK(inspect_detect((tmp.path / "m.jsonl").string()) == InspectKind::metrics);
  const std::string out = inspect_text((tmp.path / "m.jsonl").string(), {});
  CHECK(out.find("1 steps missing") != std::string::npos);
  CHECK(out.find("lowest 1.5000 at step 3") != std::string::npos);
  CHECK(out.find("1 non-finite, first at step 7") != std::string::npos);
}

TEST_CASE("inspect_shard counts tokens and documents of Llama 3 and GPT-2 shards", "[inspect]") {
  TempDir tmp;
  // Llama 3: documents of 3, 5 and 2 tokens, each starting with <|begin_of_text|>.
  const uint32_t bos = 128000;
  const std::vector<uint32_t> toks = {bos, 9, 10, bos, 1, 2, 3, 128255, bos, 7};
  write_shard(tmp.path / "train_000000.bin", 20240801, 7, toks, 4);
  CHECK(inspect_detect((tmp.path / "train_000000.bin").string()) == InspectKind::shard);
  const ShardSummary s = inspect_shard((tmp.path / "train_000000.bin").string());
  CHECK(s.magic == 20240801);
  CHECK(s.token_bytes == 4);
  CHECK(s.tokens == 10);
  CHECK(s.bos_id == bos);
  CHECK(s.documents == 3);
  CHECK(s.min_doc_tokens == 2);
  CHECK(s.max_doc_tokens == 5);
  CHECK(s.mean_doc_tokens == Approx(10.0 / 3.0));
  CHECK(s.max_token_id == 128255);

  // GPT-2 (uint16) shard: a partial document before the first <|endoftext|> counts as one.
  write_shard(tmp.path / "gpt2.bin", 20240520, 1, {5, 6, 50256, 1, 2, 3, 50256, 4}, 2);
  const ShardSummary g = inspect_shard((tmp.path / "gpt2.bin").string());
  CHECK(g.token_bytes == 2);
  CHECK(g.tokens == 8);
  CHECK(g.documents == 3);
  CHECK(g.min_doc_tokens == 2);
  CHECK(g.max_doc_tokens == 4);
  CHECK(g.max_token_id == 50256);
  CHECK(inspect_text((tmp.path / "gpt2.bin").string(), {}).find("16-bit tokens") != std::string::npos);

  // A shard shorter than its header says is rejected, naming the file.
  std::string bytes = read_text(tmp.path / "train_000000.bin");
  write_text(tmp.path / "short.bin", bytes.substr(0, bytes.size() - 4));
  CHECK(user_error_of([&] { inspect_shard((tmp.path / "short.bin").string()); }).find("short.bin") != std::string::npos);
  write_text(tmp.path / "junk.bin", std::string(2048, 'x'));
  CHECK(user_error_of([&] { inspect_detect((tmp.path / "junk.bin").string()); }).find("magic") != std::string::npos);
}

TEST_CASE("inspect_dataset sums the manifest per split and reports missing shards", "[inspect]") {
  TempDir tmp;
  const fs::path dir = tmp.path / "data";
  fs::create_directories(dir);
  Manifest m;
  m.tokenizer_name = "llama3";
  m.tokenizer_sha256 = std::string(64, '0');
  m.vocab_size = 128256;
  m.bos_id = 128000;
  const std::vector<std::vector<uint32_t>> shards = {{128000, 1, 2, 128000, 3}, {128000, 4, 5, 6}, {128000, 7}};
  const char* splits[] = {"train", "train", "val"};
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = std::string(splits[i]) + "_" + std::to_string(i) + ".bin";
    const ShardWriteResult w = shard_write((dir / name).string(), shards[i].data(), static_cast<int64_t>(shards[i].size()));
    ManifestShard ms;
    ms.file = name;
    ms.split = splits[i];
    ms.tokens = w.tokens;
    ms.documents = i == 0 ? 2 : 1;
    ms.max_token_id = w.max_token_id;
    ms.sha256 = w.sha256;
    m.shards.push_back(ms);
  }
  manifest_write(dir.string(), m);
  CHECK(inspect_detect(dir.string()) == InspectKind::dataset);
  DatasetSummary d = inspect_dataset(dir.string());
  CHECK(d.tokenizer == "llama3");
  CHECK(d.splits.at("train").shards == 2);
  CHECK(d.splits.at("train").tokens == 9);
  CHECK(d.splits.at("train").documents == 3);
  CHECK(d.splits.at("val").tokens == 2);
  CHECK(d.problems.empty());
  CHECK(inspect_text(dir.string(), {}).find("headers and sizes match") != std::string::npos);

  fs::remove(dir / "train_1.bin");
  d = inspect_dataset(dir.string());
  REQUIRE(d.problems.size() == 1);
  CHECK(d.problems[0].find("train_1.bin") != std::string::npos);
}

TEST_CASE("flexcp inspect CLI prints text or JSON for several paths and fails with exit 2 on bad input", "[inspect][cli]") {
  TempDir tmp;
  write_safetensors(tmp.path / "a.safetensors", small_model());
  write_text(tmp.path / "run" / "metrics.jsonl", metrics_line(1, 3.0) + metrics_line(2, 2.5));
  const std::string a = "'" + (tmp.path / "a.safetensors").string() + "'", run = "'" + (tmp.path / "run").string() + "'";

  CliRun t = cli_run("inspect " + a + " " + run + " --brief", tmp.path);
  INFO(t.out << t.err);
  CHECK(t.rc == 0);
  CHECK(t.out.find("model.layers.*.mlp.up_proj.weight") != std::string::npos);
  CHECK(t.out.find("steps: 1..2") != std::string::npos);

  CliRun j = cli_run("inspect " + run + " --json", tmp.path);
  CHECK(j.rc == 0);
  const auto parsed = nlohmann::json::parse(j.out);
  CHECK(parsed["kind"] == "run");
  CHECK(parsed["metrics"]["last_loss"] == 2.5);
  CliRun both = cli_run("inspect " + a + " " + run + " --json --stats", tmp.path);
  CHECK(both.rc == 0);
  CHECK(nlohmann::json::parse(both.out).size() == 2);

  CliRun missing = cli_run("inspect '" + (tmp.path / "nope").string() + "'", tmp.path);
  CHECK(missing.rc == 2);
  CHECK(missing.err.find("no such file") != std::string::npos);
  write_text(tmp.path / "bad.safetensors", std::string("\x10\0\0\0\0\0\0\0{\"x\": 1}       ", 24));
  CliRun bad = cli_run("inspect '" + (tmp.path / "bad.safetensors").string() + "'", tmp.path);
  CHECK(bad.rc == 2);
  CHECK(bad.err.find("bad.safetensors") != std::string::npos);
}
