// The run config (core/config.*), the HF config.json reader/writer (core/hf_config.*), atomic writes
// (core/atomic_file.*) and the `flexcp train` / `flexcp config-reference` front end.
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/atomic_file.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/hf_config.h"
#include "core/llama_arch.h"
#include "test/test_util.h"

namespace fs = std::filesystem;
using namespace flexcp;
using namespace flexcp::test;

namespace {

const std::string kSrc = FLEXCP_SOURCE_DIR;

// Minimal valid config the tests build on (data.synthetic so no data.path is needed).
const std::string kBase = "model:\n  preset: tiny\ndata:\n  synthetic: true\n";

RunConfig from(const std::string& text, const std::vector<std::string>& sets = {}) {
  return config_from_string(text, "t.yaml", sets);
}

// Flattens a YAML document into dotted keys -> scalar text, with yaml-cpp alone (an independent reader
// of what config_to_yaml prints).
void flatten(const YAML::Node& n, const std::string& prefix, std::map<std::string, std::string>& out) {
  for (const auto& kv : n) {
    const std::string key = prefix.empty() ? kv.first.Scalar() : prefix + "." + kv.first.Scalar();
    if (kv.second.IsMap()) flatten(kv.second, key, out);
    else out[key] = kv.second.Scalar();
  }
}

}  // namespace

TEST_CASE("every shipped config loads and derives for its cp", "[config]") {
  int count = 0;
  for (const auto& entry : fs::directory_iterator(kSrc + "/configs")) {
    if (entry.path().extension() != ".yaml") continue;
    ++count;
    const std::string path = entry.path().string();
    INFO(path);
    RunConfig cfg;
    REQUIRE_NOTHROW(cfg = config_load(path));
    CHECK(cfg.source == path);
    for (int64_t world : {int64_t{1}, int64_t{2}, int64_t{4}, int64_t{8}})
      if (world % cfg.parallel.cp == 0 && cfg.train.global_batch % (world / cfg.parallel.cp * cfg.train.micro_batch) == 0)
        CHECK_NOTHROW(config_derive(cfg, world));
    CHECK_NOTHROW(config_derive(cfg, cfg.parallel.cp));
  }
  CHECK(count >= 9);

  const RunConfig tiny = config_load(kSrc + "/configs/tiny.yaml");
  CHECK(tiny.model.preset == "tiny");
  CHECK(tiny.model.arch.hidden_size == 128);
  CHECK(tiny.data.path == "data/nlp-corpus");
  CHECK(tiny.train.seq_len == 256);
  CHECK(tiny.train.global_batch == 4);
  CHECK(tiny.train.micro_batch == 2);
  CHECK(tiny.train.steps == 150);
  CHECK(tiny.train.lr == 3e-3);
  CHECK(tiny.train.min_lr == 3e-4);
  CHECK(tiny.train.warmup == 15);
  CHECK(tiny.parallel.attention == "torch");
  CHECK(tiny.logging.dir == "runs/tiny");
  CHECK(tiny.checkpoint.dir == "runs/tiny/checkpoints");  // default follows logging.dir
  CHECK(tiny.checkpoint.every == 100);
  const DerivedNumbers d = config_derive(tiny, 1);
  CHECK(d.grad_accum == 2);
  CHECK(d.tokens_per_step == 4 * 256);

  for (int cp : {1, 2, 4, 8}) {
    const RunConfig c = config_load(kSrc + "/configs/llama3.2-1b-cp" + std::to_string(cp) + ".yaml");
    CHECK(c.parallel.cp == cp);
    CHECK(c.parallel.attention == "ffa");
    CHECK(c.train.seq_len == 8192);
    CHECK(c.train.global_batch == 8);
    CHECK(c.train.steps == 2000);
    CHECK(c.train.dtype == "bf16");
    // Llama-3.2-1B has 1,235,814,400 parameters (embedding tied), as its model card says.
    CHECK(config_derive(c, cp).params == 1235814400);
  }
  for (int cp : {1, 2, 4}) {
    const RunConfig c = config_load(kSrc + "/configs/tiny-cp" + std::to_string(cp) + ".yaml");
    CHECK(c.parallel.cp == cp);
    CHECK(c.parallel.attention == "reference");
    CHECK(c.parallel.communicator == "auto");  // mpi under mpirun, tcp under flexcp launch
  }
}

TEST_CASE("resolution order: preset, then YAML keys, then --set", "[config]") {
  const RunConfig plain = from(kBase);
  CHECK(plain.model.arch.hidden_size == 128);  // the tiny preset

  RunConfig c = from("model:\n  preset: tiny\n  hidden_size: 256\n  rope_scaling:\n    factor: 16\ndata:\n  synthetic: true\n");
  CHECK(c.model.arch.hidden_size == 256);
  CHECK(c.model.arch.num_layers == 4);  // untouched keys keep the preset's value
  CHECK(c.model.arch.rope_scaling.factor == 16.0);

  // --set beats the file, and a later --set beats an earlier one.
  c = from("model:\n  preset: tiny\n  hidden_size: 256\ndata:\n  synthetic: true\ntrain:\n  lr: 0.001\n",
           {"model.hidden_size=512", "train.lr=1e-4", "train.lr=2.5e-4"});
  CHECK(c.model.arch.hidden_size == 512);
  CHECK(c.train.lr == 2.5e-4);

  // Switching the preset with --set swaps the whole architecture, and explicit keys still apply on top.
  c = from("model:\n  preset: tiny\n  num_layers: 2\ndata:\n  synthetic: true\n", {"model.preset=llama3.2-1b"});
  CHECK(c.model.arch.hidden_size == 2048);
  CHECK(c.model.arch.num_layers == 2);
}

TEST_CASE("overrides (--set) parse values as YAML: nested keys, bools, strings, sections", "[config]") {
  RunConfig c = from(kBase, {"model.rope_scaling.factor=8", "model.rope_scaling.type=none", "train.activation_checkpointing=true",
                             "data.document_mask=yes", "parallel.deterministic=on", "logging.quiet=false",
                             "data.path=\"my data/dir\"", "train.steps=+300", "train.warmup=0"});
  CHECK(c.model.arch.rope_scaling.factor == 8.0);
  CHECK(c.model.arch.rope_scaling.type == "none");
  CHECK(c.train.activation_checkpointing);
  CHECK(c.data.document_mask);
  CHECK(c.parallel.deterministic);
  CHECK_FALSE(c.logging.quiet);
  CHECK(c.data.path == "my data/dir");
  CHECK(c.train.steps == 300);
  CHECK(c.train.warmup == 0);

  c = from(kBase, {"model.rope_scaling={type: none, factor: 2.0}", "train.lr=3e-4"});
  CHECK(c.model.arch.rope_scaling.type == "none");
  CHECK(c.model.arch.rope_scaling.factor == 2.0);
  CHECK(c.train.lr == 3e-4);

  c = from(kBase, {"data.path=", "model.from="});  // empty strings
  CHECK(c.data.path.empty());
  CHECK(c.model.from.empty());
}

TEST_CASE("errors name the file, the key and a fix", "[config]") {
  // Unknown keys, with the line and a did-you-mean.
  require_contains(user_error_of([] { from(kBase + "train:\n  lrr: 0.1\n"); }),
                   {"t.yaml:6", "train.lrr", "unknown key", "did you mean train.lr?"});
  require_contains(user_error_of([] { from(kBase + "trian:\n  lr: 0.1\n"); }), {"t.yaml:5", "trian", "did you mean train?"});
  require_contains(user_error_of([] { from(kBase + "train:\n  cp: 2\n"); }), {"train.cp", "did you mean parallel.cp?"});
  require_contains(user_error_of([] { from("model:\n  num_hidden_layers: 2\n"); }),
                   {"model.num_hidden_layers", "did you mean model.num_layers?"});
  require_contains(user_error_of([] { from(kBase, {"train.lerning_rate=1"}); }),
                   {"--set train.lerning_rate=1", "did you mean train.lr?"});
  require_contains(user_error_of([] { from(kBase + "train:\n  zzzzzzzz: 1\n"); }), {"train.zzzzzzzz", "keys in train:", "seq_len"});
  require_contains(user_error_of([] { from(kBase + "xyzzy: 1\n"); }), {"xyzzy", "sections are:"});
  require_contains(user_error_of([] { from(kBase + "train:\n  warmpu: 3\n"); }), {"t.yaml:6", "train.warmpu", "did you mean train.warmup?"});
  require_contains(user_error_of([] { from("model:\n  preset: tiny\n  preset: tiny\n"); }), {"t.yaml:3", "model.preset", "set twice"});

  // Wrong types.
  require_contains(user_error_of([] { from(kBase + "train:\n  lr: fast\n"); }),
                   {"t.yaml:6", "train.lr: expected a number, got 'fast'", "lr: "});
  require_contains(user_error_of([] { from(kBase + "train:\n  steps: 1.5\n"); }), {"train.steps: expected an integer, got '1.5'"});
  require_contains(user_error_of([] { from(kBase + "train:\n  steps: [1, 2]\n"); }), {"train.steps", "got a list"});
  require_contains(user_error_of([] { from(kBase + "train:\n  lr:\n"); }), {"train.lr", "got nothing"});
  require_contains(user_error_of([] { from("data:\n  synthetic: maybe\n"); }), {"data.synthetic", "true or false"});
  require_contains(user_error_of([] { from(kBase + "train: 3\n"); }), {"t.yaml:5", "train", "expected a section"});
  require_contains(user_error_of([] { from(kBase + "train:\n  lr: {a: 1}\n"); }), {"train.lr", "got a section"});

  // Enums list the choices.
  require_contains(user_error_of([] { from(kBase + "train:\n  schedule: cosin\n"); }),
                   {"train.schedule", "cosine, linear, constant", "'cosin'", "did you mean cosine?"});
  require_contains(user_error_of([] { from(kBase, {"model.preset=llama"}); }), {"model.preset", "llama3.2-1b", "tiny"});

  // Ranges and impossible combinations.
  require_contains(user_error_of([] { from(kBase, {"train.seq_len=0"}); }), {"train.seq_len", ">= 1", "got 0"});
  require_contains(user_error_of([] { from(kBase, {"train.lr=0"}); }), {"train.lr", "> 0"});
  require_contains(user_error_of([] { from(kBase, {"train.beta2=1.0"}); }), {"train.beta2", "< 1.0"});
  require_contains(user_error_of([] { from(kBase, {"train.micro_batch=16"}); }),
                   {"t.yaml", "train.micro_batch (16)", "train.global_batch (8)"});
  require_contains(user_error_of([] { from(kBase, {"train.min_lr=1e-2", "train.lr=1e-3"}); }), {"train.min_lr", "train.lr"});
  require_contains(user_error_of([] { from(kBase, {"model.num_kv_heads=3"}); }), {"model.num_heads", "model.num_kv_heads (3)"});
  require_contains(user_error_of([] { from(kBase, {"parallel.cp=3"}); }), {"parallel.cp (3)", "power of two"});
  require_contains(user_error_of([] { from(kBase, {"parallel.cp=6"}); }), {"parallel.cp (6)", "power of two"});
  require_contains(user_error_of([] { from(kBase, {"parallel.attention=ffa", "train.device=cpu"}); }),
                   {"parallel.attention", "ffa", "cpu"});
  require_contains(user_error_of([] { from(kBase, {"parallel.attention=ffa", "train.device=cuda", "model.head_dim=32"}); }),
                   {"parallel.attention: ffa", "head_dim 64 or 128", "is 32"});
  CHECK_NOTHROW(from(kBase, {"parallel.attention=ffa", "train.device=cuda", "model.head_dim=64"}));
  require_contains(user_error_of([] { from("model:\n  preset: tiny\n"); }), {"t.yaml", "data.path", "data.synthetic"});
  require_contains(user_error_of([] { from(kBase, {"train.seq_len=200000"}); }), {"train.seq_len", "max_position_embeddings"});
  // bf16 on CPU is allowed (slow but valid).
  CHECK_NOTHROW(from(kBase, {"train.dtype=bf16", "train.device=cpu"}));

  // Files, syntax, duplicates, malformed --set.
  require_contains(user_error_of([] { config_load("/nonexistent/run.yaml"); }), {"/nonexistent/run.yaml", "cannot open"});
  require_contains(user_error_of([] { from("train:\n  lr: [1, 2\n"); }), {"t.yaml", "not valid YAML"});
  require_contains(user_error_of([] { from(kBase + "train:\n  lr: 1\n  lr: 2\n"); }), {"t.yaml:7", "train.lr", "set twice"});
  require_contains(user_error_of([] { from(kBase + "train:\n  lr: 1\ntrain:\n  steps: 2\n"); }), {"train", "set twice"});
  require_contains(user_error_of([] { from(kBase, {"train.lr"}); }), {"--set train.lr", "key=value"});
  require_contains(user_error_of([] { from("- 1\n- 2\n"); }), {"t.yaml", "top level"});
  require_contains(user_error_of([] { from(kBase, {"model.from=/nonexistent/model"}); }),
                   {"--set model.from=/nonexistent/model", "model.from", "/nonexistent/model"});
}

TEST_CASE("config_derive checks the world size", "[config]") {
  const RunConfig c = from(kBase, {"parallel.cp=2", "train.micro_batch=2", "train.global_batch=8"});
  const DerivedNumbers d = config_derive(c, 4);
  CHECK(d.world_size == 4);
  CHECK(d.dp == 2);
  CHECK(d.grad_accum == 2);  // 8 / (2 * 2)
  CHECK(d.tokens_per_step == 8 * 256);
  CHECK(d.params == llama_arch_num_params(c.model.arch));

  require_contains(user_error_of([&] { config_derive(c, 3); }), {"t.yaml", "parallel.cp (2)", "world size (3"});
  require_contains(user_error_of([&] { config_derive(c, 16); }), {"train.global_batch (8)", "dp x micro_batch (8 x 2 = 16)"});
  require_contains(user_error_of([&] { config_derive(from(kBase, {"train.global_batch=6", "train.micro_batch=2"}), 2); }),
                   {"train.global_batch (6)", "2 x 2 = 4"});
  require_contains(user_error_of([&] { config_derive(from(kBase, {"parallel.cp=4", "train.seq_len=258"}), 4); }),
                   {"train.seq_len (258)", "parallel.cp (4)"});
  require_contains(user_error_of([&] { config_derive(from(kBase, {"parallel.communicator=none"}), 2); }),
                   {"parallel.communicator", "none"});
}

TEST_CASE("config_to_yaml round-trips every field exactly", "[config]") {
  const RunConfig c = from(kBase, {"train.lr=0.30000000000000004", "train.min_lr=1.2345678901234567e-7", "model.rms_norm_eps=1e-6",
                                   "model.rope_theta=10000", "data.path=\"dir with spaces/and \\\"quotes\\\"\"",
                                   "logging.dir=\"true\"", "checkpoint.dir=\"123\"", "model.hidden_size=192",
                                   "train.activation_checkpointing=true", "parallel.cp=4", "parallel.attention=reference",
                                   "train.schedule=linear", "model.rope_scaling.type=none", "train.seed=0", "model.init_std=0.006"});
  const std::string yaml = config_to_yaml(c);
  const RunConfig back = config_from_string(yaml, "printed.yaml");
  CHECK(config_to_yaml(back) == yaml);
  CHECK(back.train.lr == 0.30000000000000004);
  CHECK(back.train.min_lr == 1.2345678901234567e-7);
  CHECK(back.model.arch.rms_norm_eps == 1e-6);
  CHECK(back.data.path == "dir with spaces/and \"quotes\"");
  CHECK(back.logging.dir == "true");
  CHECK(back.checkpoint.dir == "123");
  CHECK(back.model.arch.hidden_size == 192);
  CHECK(back.train.activation_checkpointing);
  CHECK(back.parallel.cp == 4);
  CHECK(back.train.schedule == "linear");
  CHECK(back.model.arch.rope_scaling.type == "none");
  CHECK(back.model.init_std == 0.006);

  // An independent YAML reader sees the same values and types.
  const YAML::Node n = YAML::Load(yaml);
  CHECK(n["train"]["lr"].as<double>() == 0.30000000000000004);
  CHECK(n["model"]["rope_scaling"]["type"].as<std::string>() == "none");
  CHECK(n["logging"]["dir"].as<std::string>() == "true");
  CHECK(n["train"]["global_batch"].as<int64_t>() == 8);
  CHECK(n["model"]["rope_theta"].Scalar() == "10000.0");  // floats keep a '.', as YAML 1.1 readers need
  CHECK(n["model"]["rms_norm_eps"].Scalar() == "1.0e-06");

  // Every printed key is documented in the reference, and the reference has no key that is not printed.
  std::map<std::string, std::string> flat;
  flatten(n, "", flat);
  CHECK(flat.size() >= 50);
  const std::string md = config_reference_markdown();
  size_t rows = 0;
  for (size_t p = md.find("\n| `"); p != std::string::npos; p = md.find("\n| `", p + 1)) ++rows;
  CHECK(rows == flat.size());
  for (const auto& [key, value] : flat) {
    INFO(key);
    CHECK(md.find("| `" + key + "` |") != std::string::npos);
  }
  CHECK(md.find("tiny: `128`; llama3.2-1b: `2048`") == std::string::npos);  // map order is by name
  CHECK(md.find("llama3.2-1b: `2048`; tiny: `128`") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// HF config.json

// Llama-3.2-1B's config.json as published on the Hugging Face hub.
const char* kLlama32_1B = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256})";

void check_same_arch(const LlamaArch& a, const LlamaArch& b) {
  CHECK(a.vocab_size == b.vocab_size);
  CHECK(a.hidden_size == b.hidden_size);
  CHECK(a.intermediate_size == b.intermediate_size);
  CHECK(a.num_layers == b.num_layers);
  CHECK(a.num_heads == b.num_heads);
  CHECK(a.num_kv_heads == b.num_kv_heads);
  CHECK(a.head_dim == b.head_dim);
  CHECK(a.max_position_embeddings == b.max_position_embeddings);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.rms_norm_eps == b.rms_norm_eps);
  CHECK(a.tie_embeddings == b.tie_embeddings);
  CHECK(a.rope_scaling.type == b.rope_scaling.type);
  if (a.rope_scaling.type == "llama3") {
    CHECK(a.rope_scaling.factor == b.rope_scaling.factor);
    CHECK(a.rope_scaling.low_freq_factor == b.rope_scaling.low_freq_factor);
    CHECK(a.rope_scaling.high_freq_factor == b.rope_scaling.high_freq_factor);
    CHECK(a.rope_scaling.original_max_position_embeddings == b.rope_scaling.original_max_position_embeddings);
  }
  CHECK(a.bos_token_id == b.bos_token_id);
  CHECK(a.eos_token_id == b.eos_token_id);
}

TEST_CASE("hf_config reads the real Llama-3.2-1B config.json as the llama3.2-1b preset", "[config][hf]") {
  LlamaArch preset;
  REQUIRE(llama_arch_preset("llama3.2-1b", preset));
  check_same_arch(hf_config_parse(kLlama32_1B, "config.json"), preset);
}

TEST_CASE("hf_config fills HF defaults for older and newer layouts", "[config][hf]") {
  // Llama-2 style: no head_dim, no num_key_value_heads, rope_scaling null, eos as a list.
  const LlamaArch a = hf_config_parse(R"({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
      "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000, "rope_scaling": null,
      "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "eos_token_id": [2, 7], "bos_token_id": 1})", "l2.json");
  CHECK(a.head_dim == 128);
  CHECK(a.num_kv_heads == 32);
  CHECK(a.rope_scaling.type == "none");
  CHECK(a.rope_theta == 10000.0);
  CHECK_FALSE(a.tie_embeddings);
  CHECK(a.eos_token_id == 2);
  CHECK(a.bos_token_id == 1);

  // transformers 5 layout: rope_parameters with rope_theta inside.
  const LlamaArch b = hf_config_parse(R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
      "rope_parameters": {"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}})", "v5.json");
  CHECK(b.rope_theta == 250000.0);
  CHECK(b.rope_scaling.type == "llama3");
  CHECK(b.rope_scaling.factor == 8.0);
  CHECK(b.rope_scaling.original_max_position_embeddings == 2048);
  CHECK(b.head_dim == 16);
}

TEST_CASE("hf_config errors name the file and the field", "[config][hf]") {
  const std::string good = kLlama32_1B;
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const auto p = s.find(from);
    REQUIRE(p != std::string::npos);
    return s.replace(p, from.size(), to);
  };
  require_contains(user_error_of([&] { hf_config_parse(with("\"model_type\": \"llama\"", "\"model_type\": \"mistral\""), "m.json"); }),
                   {"m.json", "model_type", "mistral"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"hidden_size\": 2048,", ""), "m.json"); }),
                   {"m.json", "hidden_size", "missing"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"hidden_size\": 2048", "\"hidden_size\": \"2048\""), "m.json"); }),
                   {"m.json", "hidden_size", "expected an integer"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\""), "m.json"); }),
                   {"m.json", "rope_scaling.rope_type", "yarn"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"factor\": 32.0,", ""), "m.json"); }),
                   {"m.json", "rope_scaling.factor", "missing"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"silu\"", "\"gelu\""), "m.json"); }), {"hidden_act", "gelu"});
  require_contains(user_error_of([&] { hf_config_parse(with("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"), "m.json"); }),
                   {"num_key_value_heads"});
  require_contains(user_error_of([&] { hf_config_parse("{not json", "m.json"); }), {"m.json", "not valid JSON"});
  require_contains(user_error_of([&] { hf_config_read("/nonexistent/dir"); }), {"/nonexistent/dir", "cannot open"});
}

TEST_CASE("hf_config_write output reads back and has what transformers needs", "[config][hf]") {
  TempDir dir;
  LlamaArch tiny;
  REQUIRE(llama_arch_preset("tiny", tiny));
  tiny.tie_embeddings = false;
  tiny.rms_norm_eps = 1e-6;
  hf_config_write(tiny, dir.path.string(), "bf16");  // a folder gets config.json
  REQUIRE(fs::exists(dir.path / "config.json"));
  check_same_arch(hf_config_read(dir.path.string()), tiny);

  const auto j = nlohmann::json::parse(read_text(dir.path / "config.json"));
  CHECK(j["architectures"] == nlohmann::json::array({"LlamaForCausalLM"}));
  CHECK(j["model_type"] == "llama");
  CHECK(j["torch_dtype"] == "bfloat16");
  CHECK(j["num_hidden_layers"] == 4);
  CHECK(j["num_key_value_heads"] == 2);
  CHECK(j["tie_word_embeddings"] == false);
  CHECK(j["rope_scaling"]["rope_type"] == "llama3");
  CHECK(j["bos_token_id"] == 128000);
  CHECK(j["eos_token_id"] == 128001);
  CHECK(j["hidden_act"] == "silu");

  tiny.rope_scaling.type = "none";
  hf_config_write(tiny, (dir.path / "c2.json").string(), "fp32");
  const auto j2 = nlohmann::json::parse(read_text(dir.path / "c2.json"));
  CHECK(j2["rope_scaling"].is_null());
  CHECK(j2["torch_dtype"] == "float32");
  check_same_arch(hf_config_read((dir.path / "c2.json").string()), tiny);
  require_contains(user_error_of([&] { hf_config_write(tiny, (dir.path / "c3.json").string(), "int8"); }), {"int8"});

  // A run config can take its architecture from the folder, and explicit keys still win.
  const RunConfig c = config_from_string("model:\n  from: " + dir.path.string() + "\n  num_layers: 3\ndata:\n  synthetic: true\n", "f.yaml");
  CHECK(c.model.arch.hidden_size == 128);
  CHECK(c.model.arch.rms_norm_eps == 1e-6);
  CHECK_FALSE(c.model.arch.tie_embeddings);
  CHECK(c.model.arch.num_layers == 3);
}

// ---------------------------------------------------------------------------------------------
// Atomic writes

TEST_CASE("write_file_atomic replaces a file whole, or not at all", "[config][atomic]") {
  TempDir dir;
  const fs::path p = dir.path / "f.txt";
  write_file_atomic(p.string(), "first");
  CHECK(read_text(p) == "first");
  write_file_atomic(p.string(), "second, longer");
  CHECK(read_text(p) == "second, longer");

  {  // Not committed: the old content stays and no temporary is left behind.
    AtomicFileWriter w(p.string());
    w.write("never seen");
  }
  CHECK(read_text(p) == "second, longer");

  {  // Streaming with small and large (> internal buffer) pieces.
    std::string big(3 << 20, 'x');
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
    AtomicFileWriter w(p.string());
    w.write("head:");
    w.write(big.data(), big.size());
    w.write(":tail");
    CHECK(read_text(p) == "second, longer");  // nothing visible before commit
    w.commit();
    CHECK(w.bytes_written() == big.size() + 10);
    CHECK(read_text(p) == "head:" + big + ":tail");
  }
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) (void)e, ++files;
  CHECK(files == 1);

  require_contains(user_error_of([&] { write_file_atomic((dir.path / "missing" / "f.txt").string(), "x"); }),
                   {"missing/f.txt", "No such file"});
}

// ---------------------------------------------------------------------------------------------
// The CLI

namespace {
struct CliResult {
  int code = -1;
  std::string output;  // stdout and stderr together
  std::string err;     // stderr alone
};

CliResult run_cli(const std::string& args, const std::string& env = "") {
  TempDir tmp;
  const std::string err_file = (tmp.path / "stderr").string();
  const std::string cmd = "cd '" + kSrc + "' && env -u WORLD_SIZE -u OMPI_COMM_WORLD_SIZE -u SLURM_NTASKS " + env + " '" +
                          std::string(FLEXCP_BINARY) + "' " + args + " 2>'" + err_file + "'";
  CliResult r;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  REQUIRE(pipe);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = ::pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = read_text(err_file);
  r.output += r.err;
  return r;
}
}  // namespace

TEST_CASE("flexcp train --dry-run prints a reusable config and the derived numbers", "[config][cli]") {
  const CliResult r = run_cli("train configs/tiny.yaml --dry-run");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.err.empty());
  CHECK(r.output.find("grad_accum:      2") != std::string::npos);
  CHECK(r.output.find("dp:              1") != std::string::npos);
  CHECK(r.output.find("tokens_per_step: 1024") != std::string::npos);
  const RunConfig tiny = config_load(kSrc + "/configs/tiny.yaml");
  CHECK(r.output.find("parameters:      " + std::to_string(llama_arch_num_params(tiny.model.arch))) != std::string::npos);
  // The printed text is itself a config equal to the resolved one.
  CHECK(config_to_yaml(config_from_string(r.output, "stdout")) == config_to_yaml(tiny));

  const CliResult w = run_cli("train configs/tiny-cp2.yaml --dry-run --set train.micro_batch=2", "WORLD_SIZE=4");
  INFO(w.output);
  CHECK(w.code == 0);
  CHECK(w.output.find("world size from WORLD_SIZE") != std::string::npos);
  CHECK(w.output.find("dp:              2") != std::string::npos);
  CHECK(w.output.find("grad_accum:      2") != std::string::npos);  // 8 / (2 * 2)
  CHECK(w.output.find("micro_batch: 2") != std::string::npos);

  const CliResult o = run_cli("train configs/tiny-cp2.yaml --dry-run", "OMPI_COMM_WORLD_SIZE=3");
  CHECK(o.code == 2);
  CHECK(o.err.find("world size (3 processes)") != std::string::npos);
}

TEST_CASE("flexcp train reports bad input as one line with exit code 2", "[config][cli]") {
  const CliResult r = run_cli("train configs/tiny.yaml --dry-run --set train.lrr=1");
  INFO(r.output);
  CHECK(r.code == 2);
  CHECK(r.err == "error: --set train.lrr=1: train.lrr: unknown key; did you mean train.lr?\n");

  TempDir tmp;
  const fs::path bad = tmp.path / "bad.yaml";
  write_text(bad, "model:\n  preset: tiny\ndata:\n  synthetic: true\ntrain:\n  seq_lenn: 512\n");
  const CliResult b = run_cli("train '" + bad.string() + "' --dry-run");
  INFO(b.output);
  CHECK(b.code == 2);
  CHECK(b.err == "error: " + bad.string() + ":6: train.seq_lenn: unknown key; did you mean train.seq_len?\n");

  const CliResult m = run_cli("train configs/does-not-exist.yaml --dry-run");
  CHECK(m.code == 2);
  CHECK(m.err.find("configs/does-not-exist.yaml: cannot open") != std::string::npos);

  const CliResult both = run_cli("train configs/tiny.yaml --resume --resume-from x");
  CHECK(both.code == 2);  // CLI11 rejects the pair before anything runs
}

TEST_CASE("flexcp config-reference prints the generated reference", "[config][cli]") {
  TempDir tmp;
  const fs::path out = tmp.path / "configuration.md";
  const CliResult r = run_cli("config-reference --out '" + out.string() + "'");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(read_text(out) == config_reference_markdown());
  const CliResult s = run_cli("config-reference");
  CHECK(s.output == config_reference_markdown());
  // The shipped docs are the generated ones.
  CHECK(read_text(kSrc + "/docs/configuration.md") == config_reference_markdown());
}
