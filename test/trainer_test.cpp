// The training loop end to end on CPU: losses fall, checkpoints are complete, and --resume
// continues bit-exactly (the resumed run's per-step losses equal the uninterrupted run's).
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/safetensors.h"
#include <ATen/ATen.h>
#include <cstdlib>
#include <sys/wait.h>
#include "core/trainer.h"

using namespace flexcp;
namespace fs = std::filesystem;

namespace {

RunConfig tiny_config(const fs::path& dir, int64_t steps) {
  const std::string yaml =
      "model:\n  preset: tiny\n  vocab_size: 512\n  bos_token_id: 1\n  eos_token_id: 2\n  num_layers: 2\n"
      "data:\n  synthetic: true\n"
      "train:\n  steps: " + std::to_string(steps) + "\n  global_batch: 4\n  micro_batch: 2\n  seq_len: 32\n"
      "  lr: 0.01\n  warmup: 2\n  min_lr: 0.001\n  seed: 7\n  device: cpu\n"
      "parallel:\n  attention: reference\n"
      "checkpoint:\n  every: 3\n  keep_last: 2\n"
      "logging:\n  dir: " + dir.string() + "\n  quiet: true\n";
  return config_from_string(yaml, "test.yaml");
}

std::vector<double> read_losses(const fs::path& metrics) {
  std::vector<double> out;
  std::ifstream f(metrics);
  std::string line;
  while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return out;
}

}  // namespace

TEST_CASE("resume from a checkpoint continues bit-exactly", "[trainer]") {
  const fs::path root = fs::temp_directory_path() / "flexcp_trainer_test";
  fs::remove_all(root);
  // Uninterrupted: 6 steps.
  REQUIRE(train_run(tiny_config(root / "full", 6), {}) == 0);
  const auto full = read_losses(root / "full" / "metrics.jsonl");
  REQUIRE(full.size() == 6);

  // Interrupted after 3 steps (checkpoint at 3), then resumed to 6.
  REQUIRE(train_run(tiny_config(root / "part", 3), {}) == 0);
  CHECK(checkpoint_find_latest((root / "part" / "checkpoints").string()).find("step_00000003") != std::string::npos);
  TrainOptions resume;
  resume.resume = true;
  REQUIRE(train_run(tiny_config(root / "part", 6), resume) == 0);
  const auto resumed = read_losses(root / "part" / "metrics.jsonl");
  REQUIRE(resumed.size() == 6);
  for (size_t i = 0; i < full.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(resumed[i] == full[i]);  // bit-exact, not approximately
  }
  // keep_last: 2 checkpoints remain (steps 3 and 6 of this run).
  int complete = 0;
  for (const auto& e : fs::directory_iterator(root / "part" / "checkpoints")) complete += fs::exists(e.path() / "state.json");
  CHECK(complete == 2);
  fs::remove_all(root);
}

TEST_CASE("flexcp export writes an HF folder that reloads to the checkpoint's weights", "[trainer][export]") {
  const fs::path root = fs::temp_directory_path() / "flexcp_export_test";
  fs::remove_all(root);
  auto cfg = tiny_config(root / "run", 2);
  TrainOptions opts;
  opts.config_text = config_to_yaml(cfg);
  REQUIRE(train_run(cfg, opts) == 0);
  const std::string cmd = std::string(FLEXCP_BINARY) + " export " + (root / "run").string() + " --out " +
                          (root / "hf").string() + " --dtype fp32 --tokenizer /nonexistent > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  CHECK(fs::exists(root / "hf" / "config.json"));
  auto exported = SafetensorsSet::open((root / "hf").string());
  auto ck = checkpoint_load(checkpoint_find_latest((root / "run" / "checkpoints").string()));
  REQUIRE(exported.names().size() == ck.model.size());
  for (const auto& [name, t] : ck.model) CHECK(at::equal(exported.copy(name), t));
  // A missing checkpoint is one clear line and exit code 2.
  const std::string bad = std::string(FLEXCP_BINARY) + " export " + (root / "nothing").string() + " --out " +
                          (root / "x").string() + " > /dev/null 2>&1";
  CHECK(WEXITSTATUS(std::system(bad.c_str())) == 2);
  fs::remove_all(root);
}

TEST_CASE("metrics.csv mirrors metrics.jsonl, also across a resume", "[trainer]") {
  const fs::path root = fs::temp_directory_path() / "flexcp_csv_test";
  fs::remove_all(root);
  auto cfg = tiny_config(root, 3);
  cfg.logging.csv = true;
  REQUIRE(train_run(cfg, {}) == 0);
  cfg.train.steps = 4;
  TrainOptions resume;
  resume.resume = true;
  REQUIRE(train_run(cfg, resume) == 0);
  std::ifstream csv(root / "metrics.csv");
  std::string header, row;
  std::getline(csv, header);
  CHECK(header.rfind("step,loss,lr,grad_norm", 0) == 0);
  std::vector<std::string> rows;
  while (std::getline(csv, row)) rows.push_back(row);
  const auto losses = read_losses(root / "metrics.jsonl");
  REQUIRE(rows.size() == 4);
  REQUIRE(losses.size() == 4);
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto comma = rows[i].find(',');
    CHECK(std::stoll(rows[i].substr(0, comma)) == static_cast<long long>(i + 1));
    CHECK(std::stod(rows[i].substr(comma + 1)) == Approx(losses[i]).epsilon(1e-12));
  }
  fs::remove_all(root);
}
