// The acceptance run of context parallelism through the real command line: 20 steps of the tiny
// model (2K vocabulary, synthetic data, fp32, reference attention) with cp = 1 on one process, then
// cp = 2 and 4 under mpirun and under `flexcp launch`; per-step losses must agree within 1e-5.
// Config errors (cp not dividing the world, seq_len not divisible into chunks) stop every rank
// before any work with exit code 2.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "test/test_util.h"

namespace fs = std::filesystem;
using flexcp::test::shell_run;

namespace {

std::vector<double> losses(const fs::path& run_dir) {
  std::vector<double> v;
  std::ifstream in(run_dir / "metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) v.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return v;
}

bool have_mpirun() { return shell_run("command -v mpirun").first == 0; }

const std::string kMpirun = "mpirun --oversubscribe --allow-run-as-root -np ";

std::string train_args(int cp, const fs::path& dir) {
  return std::string(" train ") + FLEXCP_SOURCE_DIR + "/configs/tiny-cp" + std::to_string(cp) +
         ".yaml --set data.synthetic=true --set model.vocab_size=2048 --set model.bos_token_id=0"
         " --set model.eos_token_id=1 --set train.steps=20 --set train.seq_len=64 --set train.global_batch=4"
         " --set train.micro_batch=1 --set checkpoint.every=0 --set logging.dir=" +
         dir.string();
}

}  // namespace

TEST_CASE("cp training through the CLI: cp = 2 and 4 (mpirun, flexcp launch) match cp = 1", "[cp][train]") {
  const fs::path tmp = fs::temp_directory_path() / ("flexcp_cp_cli_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const std::string bin = FLEXCP_BINARY;
  auto [rc, out] = shell_run(bin + train_args(1, tmp / "cp1"));
  INFO(out);
  REQUIRE(rc == 0);
  const std::vector<double> base = losses(tmp / "cp1");
  REQUIRE(base.size() == 20);

  std::vector<std::pair<std::string, std::string>> runs;
  for (int cp : {2, 4}) {
    runs.push_back({"flexcp launch cp=" + std::to_string(cp),
                    bin + " launch --nproc-per-node " + std::to_string(cp) + " --" +
                        train_args(cp, tmp / ("launch" + std::to_string(cp)))});
    if (have_mpirun())
      runs.push_back({"mpirun cp=" + std::to_string(cp),
                      kMpirun + std::to_string(cp) + " " + bin + train_args(cp, tmp / ("mpirun" + std::to_string(cp)))});
    else
      WARN("mpirun not found: the MPI runs are skipped");
  }
  for (const auto& [name, cmd] : runs) {
    std::tie(rc, out) = shell_run(cmd);
    INFO(name << "\n" << out);
    REQUIRE(rc == 0);
    CHECK(out.find("area imbalance") != std::string::npos);  // the per-rank traffic report
    const std::string dir = cmd.substr(cmd.rfind("logging.dir=") + 12);
    const std::vector<double> got = losses(dir);
    REQUIRE(got.size() == base.size());
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - base[i]));
    std::cout << "[cp train cli] " << name << ": 20 steps, max |loss - cp1 loss| " << worst << " (step 20: " << got.back()
              << " vs " << base.back() << ")\n";
    CHECK(worst <= 1e-5);
  }
  fs::remove_all(tmp);
}

TEST_CASE("cp config errors stop every rank before any work", "[cp][train]") {
  const fs::path tmp = fs::temp_directory_path() / ("flexcp_cp_err_" + std::to_string(::getpid()));
  const std::string bin = FLEXCP_BINARY;
  // cp = 4 with 2 processes.
  auto [rc, out] = shell_run(bin + " launch --nproc-per-node 2 --" + train_args(4, tmp / "a"));
  INFO(out);
  CHECK(rc == 2);
  CHECK(out.find("parallel.cp (4) does not divide the world size (2") != std::string::npos);
  // 64 tokens do not split into 2 x 24-token chunks.
  std::tie(rc, out) = shell_run(bin + " launch --nproc-per-node 2 --" + train_args(2, tmp / "b") + " --set parallel.cp_chunk_size=24");
  INFO(out);
  CHECK(rc == 2);
  CHECK(out.find("cp_chunk_size") != std::string::npos);
  CHECK(!fs::exists(tmp / "b" / "metrics.jsonl"));
  fs::remove_all(tmp);
}
