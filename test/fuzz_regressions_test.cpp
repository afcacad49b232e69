// Every crash the fuzz targets (test/fuzz) found, replayed in the ordinary test binary: each input in
// test/fuzz/regressions/<target>/ must be rejected with a UserError (a one-line message), never with
// another exception. The fuzz build replays the same files under ASan + UBSan.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/attention_spec.h"
#include "core/errors.h"
#include "core/token_shards.h"
#include "core/tokenizer.h"

using namespace flexcp;
namespace fs = std::filesystem;

namespace {
std::vector<fs::path> regression_inputs(const std::string& target) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(fs::path(FLEXCP_SOURCE_DIR) / "test/fuzz/regressions" / target)) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

TEST_CASE("fuzz regressions: tokenizer.json fields of the wrong type are UserErrors", "[fuzz]") {
  const auto inputs = regression_inputs("tokenizer_json");
  REQUIRE(inputs.size() >= 7);
  for (const auto& p : inputs) {
    INFO(p.filename().string());
    CHECK_THROWS_AS(Tokenizer::load(p.string()), UserError);
  }
}

TEST_CASE("fuzz regressions: manifest fields of the wrong type are UserErrors", "[fuzz]") {
  const auto inputs = regression_inputs("manifest");
  REQUIRE(inputs.size() >= 5);
  for (const auto& p : inputs) {
    INFO(p.filename().string());
    std::ifstream f(p);
    const auto j = nlohmann::json::parse(f);
    CHECK_THROWS_AS(manifest_from_json(j, p.string()), UserError);
  }
}

TEST_CASE("fuzz regressions: attention spec ranges wider than int64 are rejected without overflow", "[fuzz]") {
  // The fuzz input test/fuzz/regressions/attention_spec/size_overflow: end - start overflowed int64.
  AttentionSpec spec;
  spec.num_q = spec.num_k = 16;
  const int64_t big = std::numeric_limits<int64_t>::max() / 2 + 7;
  spec.slices.push_back({{big, -big}, {0, 16}, MaskType::Causal});
  CHECK_THROWS_WITH(spec_validate(spec), Catch::Contains("negative length"));
  spec.slices[0] = {{-big, big}, {0, 16}, MaskType::Full};
  CHECK_THROWS_WITH(spec_validate(spec), Catch::Contains("outside"));
}
