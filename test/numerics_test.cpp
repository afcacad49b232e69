// The numerics guard (core/numerics_guard.h): non-finite steps are stopped with a dump or skipped
// with a counter and a limit, loss spikes are flagged; end to end, a NaN injected into one
// parameter's gradient (FLEXCP_INJECT_NONFINITE) leaves the weights exactly as they were.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/numerics_guard.h"
#include "core/optimizer.h"
#include "core/trainer.h"

using namespace flexcp;
namespace fs = std::filesystem;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

std::vector<nlohmann::json> read_records(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

RunConfig small_run(const fs::path& dir, const std::string& policy, int64_t steps) {
  const std::string yaml =
      "model:\n  preset: tiny\n  vocab_size: 256\n  hidden_size: 32\n  intermediate_size: 64\n  num_layers: 1\n"
      "  num_heads: 2\n  num_kv_heads: 1\n  head_dim: 16\n  bos_token_id: 1\n  eos_token_id: 2\n"
      "data:\n  synthetic: true\n"
      "train:\n  steps: " + std::to_string(steps) + "\n  global_batch: 4\n  micro_batch: 2\n  seq_len: 16\n"
      "  lr: 0.01\n  warmup: 1\n  seed: 3\n  device: cpu\n  on_nonfinite: " + policy + "\n  max_skipped_steps: 1\n"
      "parallel:\n  attention: reference\n"
      "checkpoint:\n  every: 1\n  keep_last: 0\n"
      "logging:\n  dir: " + dir.string() + "\n  quiet: true\n";
  return config_from_string(yaml, "numerics_test.yaml");
}

struct InjectEnv {
  explicit InjectEnv(const char* steps) { ::setenv("FLEXCP_INJECT_NONFINITE", steps, 1); }
  ~InjectEnv() { ::unsetenv("FLEXCP_INJECT_NONFINITE"); }
};

}  // namespace

TEST_CASE("numerics guard: skip counts up to the limit then stops with a dump", "[numerics]") {
  const fs::path dir = fs::temp_directory_path() / "flexcp_numerics_unit";
  fs::remove_all(dir);
  fs::create_directories(dir);
  at::Tensor a = at::ones({2, 3}), b = at::ones({4});
  FlatAdamW opt({{"a.weight", a}, {"b.weight", b}}, {});
  TrainConfig t;
  t.on_nonfinite = "skip";
  t.max_skipped_steps = 2;
  NumericsGuard g(t, dir.string(), "cfg.yaml");
  std::vector<std::pair<int64_t, int64_t>> samples = {{4, 0}, {4, 1}};
  CHECK(g.check(1, 2.0, 1.0, samples, opt).apply_update);
  auto v = g.check(2, kNaN, 1.0, samples, opt);
  CHECK_FALSE(v.finite);
  CHECK_FALSE(v.apply_update);
  CHECK(g.check(3, 2.0, INFINITY, samples, opt).apply_update == false);
  CHECK(g.skipped() == 2);
  CHECK_FALSE(fs::exists(dir / "nonfinite_step_4.json"));
  // The third one is over the limit: stop, naming the dump.
  opt.grad_flat().zero_();
  opt.grad_flat().narrow(0, opt.params()[1].offset, 4).fill_(kNaN);
  CHECK_THROWS_WITH(g.check(4, 2.0, kNaN, samples, opt), Catch::Contains("nonfinite_step_4.json") &&
                                                              Catch::Contains("max_skipped_steps"));
  const auto dump = read_json(dir / "nonfinite_step_4.json");
  CHECK(dump["step"] == 4);
  CHECK(dump["grad_norm"] == "nan");
  CHECK(dump["samples"].size() == 2);
  CHECK(dump["samples"][1]["sample"] == 1);
  CHECK(dump["nonfinite_params"] == 1);
  CHECK(dump["param_grad_norms"][0]["name"] == opt.params()[1].name);  // the bad one comes first
  fs::remove_all(dir);
}

TEST_CASE("numerics guard: stop policy stops at the first non-finite step", "[numerics]") {
  const fs::path dir = fs::temp_directory_path() / "flexcp_numerics_stop";
  fs::remove_all(dir);
  fs::create_directories(dir);
  at::Tensor a = at::ones({3});
  FlatAdamW opt({{"a.weight", a}}, {});
  TrainConfig t;  // default policy: stop
  NumericsGuard g(t, dir.string(), "cfg.yaml");
  CHECK(g.check(1, 1.0, 1.0, {}, opt).apply_update);
  CHECK_THROWS_AS(g.check(2, INFINITY, 1.0, {}, opt), UserError);
  CHECK(read_json(dir / "nonfinite_step_2.json")["loss"] == "inf");
  fs::remove_all(dir);
}

TEST_CASE("numerics guard: loss spikes against the running mean", "[numerics]") {
  at::Tensor a = at::ones({3});
  FlatAdamW opt({{"a.weight", a}}, {});
  TrainConfig t;
  t.spike_factor = 3.0;
  NumericsGuard g(t, fs::temp_directory_path().string(), "cfg.yaml");
  for (int i = 1; i <= 10; ++i) CHECK_FALSE(g.check(i, 10.0 + (i % 2), 1.0, {}, opt).spike);  // no verdict before 10
  CHECK_FALSE(g.check(11, 20.0, 1.0, {}, opt).spike);  // 2x the mean of ~10.5
  CHECK(g.check(12, 40.0, 1.0, {}, opt).spike);        // > 3x
  CHECK(g.spikes() == 1);
}

TEST_CASE("an injected NaN gradient: skip leaves the weights bit-exactly as they were", "[numerics][trainer]") {
  const fs::path dir = fs::temp_directory_path() / "flexcp_numerics_skip";
  fs::remove_all(dir);
  {
    InjectEnv env("3");
    REQUIRE(train_run(small_run(dir, "skip", 4), {}) == 0);
  }
  const auto recs = read_records(dir / "metrics.jsonl");
  REQUIRE(recs.size() == 4);
  CHECK(recs[2].value("skipped", false));
  CHECK_FALSE(recs[3].value("skipped", false));
  const fs::path ck = dir / "checkpoints";
  auto s2 = checkpoint_load((ck / "step_00000002").string());
  auto s3 = checkpoint_load((ck / "step_00000003").string());
  auto s4 = checkpoint_load((ck / "step_00000004").string());
  CHECK(s3.state["optimizer_steps"] == 2);
  CHECK(s3.state["skipped_steps"] == 1);
  CHECK(s4.state["optimizer_steps"] == 3);
  for (const auto& [name, w] : s2.model) {
    INFO(name);
    CHECK(at::equal(w, s3.model.at(name)));  // the skipped step changed nothing
    CHECK(at::isfinite(s4.model.at(name)).all().item<bool>());
  }
  for (const auto& [name, m] : s2.optimizer) CHECK(at::equal(m, s3.optimizer.at(name)));
  bool step4_moved = false;
  for (const auto& [name, w] : s3.model) step4_moved |= !at::equal(w, s4.model.at(name));
  CHECK(step4_moved);
  fs::remove_all(dir);
}

TEST_CASE("an injected NaN gradient: stop ends the run with a dump naming the parameter", "[numerics][trainer]") {
  const fs::path dir = fs::temp_directory_path() / "flexcp_numerics_stop_run";
  fs::remove_all(dir);
  {
    InjectEnv env("2");
    CHECK_THROWS_WITH(train_run(small_run(dir, "stop", 4), {}), Catch::Contains("step 2: gradient norm is not finite"));
  }
  const auto dump = read_json(dir / "nonfinite_step_2.json");
  CHECK(dump["samples"].size() == 4);
  CHECK(dump["samples"][0]["loader_step"] == 1);
  CHECK(dump["nonfinite_params"] == 1);
  CHECK(dump["param_grad_norms"][1]["norm"].is_number());
  // The run stopped before saving step 2: the newest checkpoint is step 1.
  CHECK(checkpoint_find_latest((dir / "checkpoints").string()).find("step_00000001") != std::string::npos);
  fs::remove_all(dir);
}
