// safetensors reading and writing, corrupt files, sharded folders, and the checks of loading HF
// weights into a model (missing, unexpected and mis-shaped tensors).
#include <ATen/ATen.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cstring>
#include <functional>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/hf_config.h"
#include "core/hf_weights.h"
#include "core/safetensors.h"
#include "test/test_util.h"

using namespace flexcp;
namespace fs = std::filesystem;
using flexcp::test::TempDir;

namespace {

const std::string kFixtures = std::string(FLEXCP_SOURCE_DIR) + "/test/fixtures/llama";

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file with an arbitrary header text and data buffer, declared header length optional.
std::string raw_file(const std::string& header, const std::string& data, int64_t declared_len = -1) {
  uint64_t n = declared_len < 0 ? header.size() : static_cast<uint64_t>(declared_len);
  std::string out(8, '\0');
  std::memcpy(&out[0], &n, 8);
  return out + header + data;
}

// Expects a UserError whose message names the file and contains every one of `parts`.
void expect_error(const std::string& path, const std::vector<std::string>& parts) {
  try {
    SafetensorsFile::open(path);
    FAIL("no error for " << path);
  } catch (const UserError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find(path) != std::string::npos);
    for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  }
}

NamedTensors sample_tensors() {
  at::manual_seed(11);
  NamedTensors t;
  t.emplace_back("a.f32", at::randn({3, 5}));
  t.emplace_back("b.bf16", at::randn({4, 2}).to(at::kBFloat16));
  t.emplace_back("c.f16", at::randn({7}).to(at::kHalf));
  t.emplace_back("d.f64", at::randn({2, 2, 2}, at::kDouble));
  t.emplace_back("e.i64", at::arange(10, at::kLong) - 5);
  t.emplace_back("f.i32", at::arange(6, at::kInt).reshape({2, 3}));
  t.emplace_back("g.u8", at::arange(200, 205, at::kByte));
  t.emplace_back("h.bool", at::tensor({1, 0, 1}).to(at::kBool));
  t.emplace_back("i.scalar", at::tensor(3.5f).reshape({}));
  t.emplace_back("j.empty", at::empty({0, 3}));
  t.emplace_back("k.strided", at::randn({6, 4}).t());  // not contiguous
  t.emplace_back("l.i8", at::tensor({-3, 4}).to(at::kChar));
  return t;
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype, single file", "[safetensors]") {
  TempDir tmp;
  const std::string path = tmp.file("x.safetensors");
  NamedTensors in = sample_tensors();
  safetensors_save(path, in);
  auto f = SafetensorsFile::open(path);
  CHECK(f->metadata().at("format") == "pt");
  CHECK(f->names().size() == in.size());
  for (const auto& nt : in) {
    INFO(nt.first);
    at::Tensor v = f->view(nt.first), c = f->copy(nt.first);
    CHECK(v.scalar_type() == nt.second.scalar_type());
    CHECK(v.sizes() == nt.second.sizes());
    CHECK(at::equal(v, nt.second));
    CHECK(at::equal(c, nt.second));
  }
  CHECK(f->entry("b.bf16").dtype_name == "BF16");
  // Header is padded so the data buffer starts 8-byte aligned, as HF writes it.
  const std::string bytes = read_bytes(path);
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  CHECK(hlen % 8 == 0);
  // The written header is what the Python library reads: plain JSON with data_offsets per tensor.
  auto header = nlohmann::json::parse(bytes.substr(8, hlen));
  CHECK(header["a.f32"]["dtype"] == "F32");
  CHECK(header["a.f32"]["shape"] == nlohmann::json({3, 5}));
  CHECK(header["i.scalar"]["shape"] == nlohmann::json::array());
  // No temporary file is left behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) files += e.is_regular_file();
  CHECK(files == 1);
}

TEST_CASE("safetensors views are zero-copy and outlive the file object", "[safetensors]") {
  TempDir tmp;
  const std::string path = tmp.file("v.safetensors");
  at::Tensor w = at::randn({64, 32});
  safetensors_save(path, {{"w", w}});
  at::Tensor v1, v2;
  {
    auto f = SafetensorsFile::open(path);
    v1 = f->view("w");
    v2 = f->view("w");
    CHECK(v1.data_ptr() == v2.data_ptr());  // both point into the one mapping
    at::Tensor c = f->copy("w");
    CHECK(c.data_ptr() != v1.data_ptr());
  }
  CHECK(at::equal(v1, w));  // the mapping lives on with the views
  v1.mul_(2);               // private mapping: writable, and the file stays as it was
  CHECK(at::equal(SafetensorsFile::open(path)->copy("w"), w));
}

TEST_CASE("safetensors reads the fixture files written by the Python library", "[safetensors]") {
  auto f = SafetensorsFile::open(kFixtures + "/untied/model.safetensors");
  CHECK(f->metadata().at("format") == "pt");
  CHECK(f->entry("lm_head.weight").shape == std::vector<int64_t>{1024, 64});
  auto e = SafetensorsFile::open(kFixtures + "/untied/expected.safetensors");
  CHECK(e->entry("train_losses").dtype == at::kDouble);
  CHECK(e->entry("input_ids").dtype == at::kLong);
}

TEST_CASE("safetensors sharded folders: write, read, switch layouts", "[safetensors]") {
  TempDir tmp;
  NamedTensors in;
  for (int i = 0; i < 7; ++i) in.emplace_back("t" + std::to_string(i), at::randn({10, 10}));  // 400 bytes each
  auto written = safetensors_save_sharded(tmp.path, in, 1000);
  CHECK(written.size() == 5);  // 4 shards of <= 2 tensors + the index
  CHECK(fs::exists(tmp.file("model-00001-of-00004.safetensors")));
  CHECK(fs::exists(tmp.file("model.safetensors.index.json")));
  CHECK_FALSE(fs::exists(tmp.file("model.safetensors")));
  auto index = nlohmann::json::parse(read_bytes(tmp.file("model.safetensors.index.json")));
  CHECK(index["metadata"]["total_size"] == 7 * 400);
  CHECK(index["weight_map"]["t6"] == "model-00004-of-00004.safetensors");
  SafetensorsSet set = SafetensorsSet::open(tmp.path);
  CHECK(set.num_files() == 4);
  CHECK(set.names().size() == 7);
  for (const auto& nt : in) CHECK(at::equal(set.view(nt.first), nt.second));

  // Fewer shards: the old fourth shard must go.
  safetensors_save_sharded(tmp.path, in, 1600);
  CHECK_FALSE(fs::exists(tmp.file("model-00004-of-00004.safetensors")));
  CHECK(SafetensorsSet::open(tmp.path).num_files() == 2);
  // One file: index and shards go, model.safetensors is read.
  safetensors_save_sharded(tmp.path, in, 0);
  CHECK(fs::exists(tmp.file("model.safetensors")));
  CHECK_FALSE(fs::exists(tmp.file("model.safetensors.index.json")));
  CHECK_FALSE(fs::exists(tmp.file("model-00001-of-00002.safetensors")));
  SafetensorsSet one = SafetensorsSet::open(tmp.path);
  CHECK(one.num_files() == 1);
  for (const auto& nt : in) CHECK(at::equal(one.copy(nt.first), nt.second));
}

TEST_CASE("safetensors index problems are clear errors", "[safetensors]") {
  TempDir tmp;
  NamedTensors in = {{"a", at::ones({4})}, {"b", at::ones({4})}, {"c", at::ones({4})}};
  safetensors_save_sharded(tmp.path, in, 32);  // shards [a, b] and [c]
  const std::string idx = tmp.file("model.safetensors.index.json");
  auto index = nlohmann::json::parse(read_bytes(idx));

  auto wrong = index;
  wrong["weight_map"]["a"] = "model-00002-of-00002.safetensors";
  write_bytes(idx, wrong.dump());
  CHECK_THROWS_WITH(SafetensorsSet::open(tmp.path), Catch::Contains("'a'") && Catch::Contains("does not hold it"));

  auto partial = index;
  partial["weight_map"].erase("b");
  write_bytes(idx, partial.dump());
  CHECK_THROWS_WITH(SafetensorsSet::open(tmp.path), Catch::Contains("model-00001-of-00002.safetensors: tensor 'b' is not in the index"));

  auto missing_file = index;
  missing_file["weight_map"]["c"] = "model-00009-of-00009.safetensors";
  write_bytes(idx, missing_file.dump());
  CHECK_THROWS_WITH(SafetensorsSet::open(tmp.path), Catch::Contains("model-00009-of-00009.safetensors") && Catch::Contains("cannot open"));

  write_bytes(idx, "{\"weight_map\": ");
  CHECK_THROWS_WITH(SafetensorsSet::open(tmp.path), Catch::Contains("not valid JSON"));

  TempDir empty;
  CHECK_THROWS_WITH(SafetensorsSet::open(empty.path), Catch::Contains("no model.safetensors"));
}

TEST_CASE("corrupt safetensors files each give one clear UserError", "[safetensors]") {
  TempDir tmp;
  const std::string good = tmp.file("good.safetensors");
  safetensors_save(good, {{"w", at::randn({4, 4})}, {"b", at::randn({4})}});
  const std::string bytes = read_bytes(good);
  const std::string p = tmp.file("bad.safetensors");

  SECTION("truncated data") {
    write_bytes(p, bytes.substr(0, bytes.size() - 10));
    expect_error(p, {"run past the data buffer"});
  }
  SECTION("shorter than the length field") {
    write_bytes(p, bytes.substr(0, 5));
    expect_error(p, {"too short"});
  }
  SECTION("header length beyond the file") {
    write_bytes(p, raw_file("{}", "", 1 << 20));
    expect_error(p, {"header length 1048576 runs past the end of the file"});
  }
  SECTION("huge header length") {
    write_bytes(p, raw_file("{}", "", int64_t(1) << 60));
    expect_error(p, {"runs past the end"});
  }
  SECTION("bad JSON") {
    write_bytes(p, raw_file("{\"w\": {\"dtype\": \"F32\",", ""));
    expect_error(p, {"not valid JSON"});
  }
  SECTION("header not an object") {
    write_bytes(p, raw_file("[1, 2]", ""));
    expect_error(p, {"not a JSON object"});
  }
  SECTION("offsets out of range") {
    write_bytes(p, raw_file(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}})", std::string(16, '\0')));
    expect_error(p, {"tensor 'w'", "run past the data buffer (16 bytes)"});
  }
  SECTION("offsets reversed") {
    write_bytes(p, raw_file(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", std::string(8, '\0')));
    expect_error(p, {"tensor 'w'", "end before they begin"});
  }
  SECTION("unknown dtype") {
    write_bytes(p, raw_file(R"({"w": {"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}})", std::string(16, '\0')));
    expect_error(p, {"tensor 'w'", "unsupported dtype 'F7'", "F32"});
  }
  SECTION("shape and byte length disagree") {
    write_bytes(p, raw_file(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}})", std::string(16, '\0')));
    expect_error(p, {"tensor 'w'", "needs 24 bytes but data_offsets span 16"});
  }
  SECTION("negative shape") {
    write_bytes(p, raw_file(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", std::string(4, '\0')));
    expect_error(p, {"tensor 'w'", "negative"});
  }
  SECTION("overlapping tensors") {
    write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                            std::string(16, '\0')));
    expect_error(p, {"'a' and 'b' overlap"});
  }
  SECTION("hole between tensors") {
    write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                            std::string(12, '\0')));
    expect_error(p, {"hole of 4 bytes", "'b'"});
  }
  SECTION("trailing bytes") {
    write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", std::string(12, '\0')));
    expect_error(p, {"12 bytes but the tensors cover 4"});
  }
  SECTION("missing fields") {
    write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "data_offsets": [0, 4]}})", std::string(4, '\0')));
    expect_error(p, {"tensor 'a'", "\"shape\""});
  }
  SECTION("bad metadata") {
    write_bytes(p, raw_file(R"({"__metadata__": {"format": 1}})", ""));
    expect_error(p, {"__metadata__.format is not a string"});
  }
  SECTION("missing file") { expect_error(tmp.file("nope.safetensors"), {"cannot open"}); }
  SECTION("a folder") { expect_error(tmp.path, {"not a regular file"}); }
  SECTION("asking for an absent tensor") {
    auto f = SafetensorsFile::open(good);
    CHECK_THROWS_WITH(f->view("nope"), Catch::Contains(good) && Catch::Contains("no tensor named 'nope'"));
  }
}

TEST_CASE("safetensors writer rejects what it cannot write", "[safetensors]") {
  TempDir tmp;
  CHECK_THROWS_AS(safetensors_save(tmp.file("a.safetensors"), {{"x", at::ones({2})}, {"x", at::ones({2})}}), UserError);
  CHECK_THROWS_AS(safetensors_save(tmp.file("a.safetensors"), {{"__metadata__", at::ones({2})}}), UserError);
  CHECK_THROWS_AS(safetensors_save(tmp.file("a.safetensors"), {{"c", at::ones({2}, at::kComplexFloat)}}), UserError);
  CHECK_THROWS_AS(safetensors_save(tmp.file("no/such/dir/a.safetensors"), {{"x", at::ones({2})}}), UserError);
  CHECK_FALSE(fs::exists(tmp.file("a.safetensors")));
}

// ------------------------------------------------------------------------------------------------
// Loading HF weights into the model

namespace {

// A copy of the untied fixture folder whose weights were changed by `edit`.
std::string edited_fixture(const TempDir& tmp, const std::function<void(NamedTensors&)>& edit) {
  fs::copy_file(kFixtures + "/untied/config.json", tmp.file("config.json"));
  auto f = SafetensorsFile::open(kFixtures + "/untied/model.safetensors");
  NamedTensors t;
  for (const auto& n : f->names()) t.emplace_back(n, f->copy(n));
  edit(t);
  safetensors_save(tmp.file("model.safetensors"), t);
  return tmp.path;
}

}  // namespace

TEST_CASE("HF weight loading checks names and shapes", "[safetensors][hf]") {
  LlamaArch arch = hf_config_read(kFixtures + "/untied");
  LlamaModel m(arch);

  SECTION("all present") { CHECK_NOTHROW(hf_load_weights(*m, kFixtures + "/untied")); }
  SECTION("missing tensor") {
    TempDir tmp;
    auto dir = edited_fixture(tmp, [](NamedTensors& t) {
      t.erase(std::remove_if(t.begin(), t.end(), [](auto& x) { return x.first == "model.layers.1.mlp.up_proj.weight"; }), t.end());
    });
    CHECK_THROWS_WITH(hf_load_weights(*m, dir),
                      Catch::Contains("1 tensor(s) the model needs are missing: model.layers.1.mlp.up_proj.weight"));
  }
  SECTION("unexpected tensor") {
    TempDir tmp;
    auto dir = edited_fixture(tmp, [](NamedTensors& t) { t.emplace_back("model.layers.2.mlp.up_proj.weight", at::ones({2})); });
    CHECK_THROWS_WITH(hf_load_weights(*m, dir),
                      Catch::Contains("have no place in the model: model.layers.2.mlp.up_proj.weight"));
  }
  SECTION("shape mismatch") {
    TempDir tmp;
    auto dir = edited_fixture(tmp, [](NamedTensors& t) {
      for (auto& x : t)
        if (x.first == "model.layers.0.self_attn.k_proj.weight") x.second = at::ones({64, 64});
    });
    CHECK_THROWS_WITH(hf_load_weights(*m, dir), Catch::Contains("'model.layers.0.self_attn.k_proj.weight' has shape [64, 64]") &&
                                                    Catch::Contains("expects [32, 64]"));
  }
  SECTION("integer weights") {
    TempDir tmp;
    auto dir = edited_fixture(tmp, [](NamedTensors& t) {
      for (auto& x : t)
        if (x.first == "model.norm.weight") x.second = at::ones({64}, at::kLong);
    });
    CHECK_THROWS_WITH(hf_load_weights(*m, dir), Catch::Contains("'model.norm.weight' is I64"));
  }
  SECTION("bf16 weights are converted") {
    TempDir tmp;
    auto dir = edited_fixture(tmp, [](NamedTensors& t) {
      for (auto& x : t) x.second = x.second.to(at::kBFloat16);
    });
    hf_load_weights(*m, dir);
    at::Tensor want = SafetensorsFile::open(kFixtures + "/untied/model.safetensors")->copy("model.norm.weight");
    CHECK(at::equal(m->model->norm->weight, want.to(at::kBFloat16).to(at::kFloat)));
  }
  SECTION("a tied checkpoint with a stored lm_head equal to the embedding, into a bf16 model") {
    TempDir tmp;
    fs::copy_file(kFixtures + "/tied/config.json", tmp.file("config.json"));
    auto f = SafetensorsFile::open(kFixtures + "/tied/model.safetensors");
    NamedTensors t;
    for (const auto& n : f->names()) t.emplace_back(n, f->copy(n));
    t.emplace_back("lm_head.weight", f->copy("model.embed_tokens.weight"));
    safetensors_save(tmp.file("model.safetensors"), t);
    LlamaModel mt(hf_config_read(tmp.path));
    mt->to(at::kBFloat16);
    CHECK_NOTHROW(hf_load_weights(*mt, tmp.path));
  }
  SECTION("an untied checkpoint into a tied model") {
    LlamaArch tied = arch;
    tied.tie_embeddings = true;
    LlamaModel mt(tied);
    CHECK_THROWS_WITH(hf_load_weights(*mt, kFixtures + "/untied"),
                      Catch::Contains("lm_head.weight differs from model.embed_tokens.weight"));
  }
  SECTION("a tied checkpoint into an untied model") {
    LlamaArch t = hf_config_read(kFixtures + "/tied");
    t.tie_embeddings = false;
    LlamaModel mu(t);
    CHECK_THROWS_WITH(hf_load_weights(*mu, kFixtures + "/tied"), Catch::Contains("missing: lm_head.weight"));
  }
}
