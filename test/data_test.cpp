// Token shards, the manifest, the loader and prepare-data; each bad input of issue 4 (a clear
// one-line UserError, exit code 2 from the CLI, nothing half-written left as if complete).
#include <catch2/catch.hpp>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "core/atomic_file.h"
#include "core/data_loader.h"
#include "core/errors.h"
#include "core/prepare_data.h"
#include "core/sha256.h"
#include "core/token_shards.h"
#include "core/tokenizer.h"
#include "test/data_fixtures.h"

using namespace flexcp;
using test::error_of;
using test::TempDir;
namespace fs = std::filesystem;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_raw_shard(const std::string& path, int32_t magic, int32_t version, int32_t count, const std::string& payload) {
  int32_t header[256] = {};
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header), sizeof header);
  out << payload;
}

// A data set written by hand (no tokenizer): shards of the given tokens, manifest listing them.
Manifest make_dataset(const std::string& dir, const std::vector<std::pair<std::string, std::vector<uint32_t>>>& shards,
                      int64_t bos = 128000) {
  Manifest m;
  m.created_by = "data_test";
  m.tokenizer_name = "test";
  m.tokenizer_sha256 = std::string(64, '0');
  m.vocab_size = 128256;
  m.bos_id = bos;
  int index = 0;
  for (const auto& [split, tokens] : shards) {
    ManifestShard s;
    s.file = split + "_00000000_" + std::to_string(100000 + index++).substr(0, 6) + ".bin";
    ShardWriteResult w = shard_write((fs::path(dir) / s.file).string(), tokens.data(), int64_t(tokens.size()));
    s.split = split;
    s.tokens = w.tokens;
    s.max_token_id = w.max_token_id;
    s.sha256 = w.sha256;
    s.documents = std::count(tokens.begin(), tokens.end(), uint32_t(bos));
    m.shards.push_back(s);
  }
  manifest_write(dir, m);
  return m;
}

DataConfig data_at(const std::string& dir) {
  DataConfig c;
  c.path = dir;
  return c;
}

// Runs the flexcp binary; returns the exit code and fills `err` with its stderr.
int run_flexcp(const std::string& args, std::string& err) {
  TempDir tmp;
  std::string err_file = tmp.file("stderr");
  std::string cmd = std::string(FLEXCP_BINARY) + " " + args + " >/dev/null 2>" + err_file;
  int status = std::system(cmd.c_str());
  err = read_file(err_file);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

// ---------------------------------------------------------------- SHA-256

TEST_CASE("sha256: FIPS 180-4 test vectors whole and in pieces", "[data]") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::string million(1000000, 'a');
  CHECK(sha256_hex(million) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  Sha256 h;
  for (size_t i = 0; i < million.size(); i += 997) h.update(std::string_view(million).substr(i, 997));
  CHECK(h.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// ---------------------------------------------------------------- shards

TEST_CASE("shards: write and read back (Llama 3 uint32 and llm.c GPT-2 uint16)", "[data]") {
  TempDir dir;
  std::vector<uint32_t> tokens;
  std::mt19937 rng(1);
  for (int i = 0; i < 5000; ++i) tokens.push_back(rng() % 128256);
  std::string path = dir.file("a.bin");
  ShardWriteResult w = shard_write(path, tokens.data(), int64_t(tokens.size()));
  CHECK(w.tokens == 5000);
  CHECK(w.max_token_id == *std::max_element(tokens.begin(), tokens.end()));
  CHECK(w.sha256 == sha256_file(path));
  CHECK(fs::file_size(path) == 1024 + 4 * 5000);
  // The header, byte for byte as llm.c writes it.
  std::string bytes = read_file(path);
  int32_t header[256];
  std::memcpy(header, bytes.data(), sizeof header);
  CHECK(header[0] == 20240801);
  CHECK(header[1] == 7);
  CHECK(header[2] == 5000);
  CHECK(std::all_of(header + 3, header + 256, [](int32_t v) { return v == 0; }));
  ShardFile f = ShardFile::open(path);
  CHECK(f.num_tokens() == 5000);
  CHECK(f.token_bytes() == 4);
  std::vector<int32_t> back(5000);
  f.copy(0, 5000, back.data());
  CHECK(std::equal(back.begin(), back.end(), tokens.begin()));
  CHECK(f.token(4999) == tokens[4999]);
  // No temporary file is left behind.
  for (const auto& e : fs::directory_iterator(dir.path)) CHECK(e.path().filename().string().find(".tmp") == std::string::npos);

  std::string gpt2 = dir.file("gpt2.bin");
  uint16_t small[3] = {50256, 7, 65535};
  write_raw_shard(gpt2, 20240520, 1, 3, std::string(reinterpret_cast<const char*>(small), sizeof small));
  ShardFile g = ShardFile::open(gpt2);
  CHECK(g.token_bytes() == 2);
  std::vector<int32_t> gt(3);
  g.copy(0, 3, gt.data());
  CHECK(gt == std::vector<int32_t>{50256, 7, 65535});
}

TEST_CASE("shards: wrong magic or version or length is one clear error", "[data][bad-input]") {
  TempDir dir;
  std::string payload(4 * 10, '\0');
  std::string magic = dir.file("magic.bin"), version = dir.file("version.bin"), length = dir.file("length.bin"),
              tiny = dir.file("tiny.bin"), negative = dir.file("negative.bin");
  write_raw_shard(magic, 12345, 7, 10, payload);
  write_raw_shard(version, 20240801, 6, 10, payload);
  write_raw_shard(length, 20240801, 7, 11, payload);  // header says 11, file holds 10
  write_raw_shard(negative, 20240801, 7, -1, payload);
  std::ofstream(tiny) << "short";
  CHECK_THAT(error_of([&] { ShardFile::open(magic); }), Catch::Contains(magic) && Catch::Contains("magic 12345"));
  CHECK_THAT(error_of([&] { ShardFile::open(version); }), Catch::Contains(version) && Catch::Contains("version 6"));
  CHECK_THAT(error_of([&] { ShardFile::open(length); }), Catch::Contains(length) && Catch::Contains("disagrees"));
  CHECK_THAT(error_of([&] { ShardFile::open(negative); }), Catch::Contains("disagrees"));
  CHECK_THAT(error_of([&] { ShardFile::open(tiny); }), Catch::Contains("shorter than its 1024-byte header"));
  CHECK_THAT(error_of([&] { ShardFile::open(dir.file("none.bin")); }), Catch::Contains("shard not found"));
}

// ---------------------------------------------------------------- manifest

TEST_CASE("manifest: round trip and checks", "[data]") {
  TempDir dir;
  Manifest m = make_dataset(dir.path.string(), {{"train", {128000, 1, 2, 3, 128000, 4}}, {"val", {128000, 9}}});
  Manifest r = manifest_read(dir.path.string());
  CHECK(manifest_to_json(r) == manifest_to_json(m));
  CHECK(r.split_tokens("train") == 6);
  CHECK(r.split_documents("train") == 2);
  CHECK(r.split_shards("val") == 1);
  CHECK(r.shards[0].max_token_id == 128000);
  CHECK_NOTHROW(dataset_verify(dir.path.string(), r, true));

  // A shard that changed after it was written.
  std::string shard = (dir.path / r.shards[0].file).string();
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1024 + 4);
    uint32_t v = 5;
    f.write(reinterpret_cast<const char*>(&v), 4);
  }
  CHECK_NOTHROW(dataset_verify(dir.path.string(), r, false));  // sizes still agree
  CHECK_THAT(error_of([&] { dataset_verify(dir.path.string(), r, true); }), Catch::Contains("SHA-256"));
  Manifest wrong_count = r;
  wrong_count.shards[1].tokens = 3;
  CHECK_THAT(error_of([&] { dataset_verify(dir.path.string(), wrong_count, false); }),
             Catch::Contains("the manifest says 3"));
}

TEST_CASE("manifest: missing or broken manifests are one clear error", "[data][bad-input]") {
  TempDir dir;
  std::string d = dir.path.string();
  CHECK_THAT(error_of([&] { manifest_read(d + "/nope"); }), Catch::Contains("data set folder not found"));
  CHECK_THAT(error_of([&] { manifest_read(d); }), Catch::Contains("manifest.json") && Catch::Contains("incomplete"));
  dir.write("manifest.json", "{not json");
  CHECK_THAT(error_of([&] { manifest_read(d); }), Catch::Contains("not valid JSON"));
  dir.write("manifest.json", R"({"format": "something-else"})");
  CHECK_THAT(error_of([&] { manifest_read(d); }), Catch::Contains("not a flexcp data set manifest"));
  make_dataset(d, {{"train", {1, 2, 3}}});
  nlohmann::json j = nlohmann::json::parse(read_file(d + "/manifest.json"));
  auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json k = j;
    edit(k);
    dir.write("manifest.json", k.dump());
    return error_of([&] { manifest_read(d); });
  };
  CHECK_THAT(with([](nlohmann::json& k) { k["format_version"] = 99; }), Catch::Contains("format_version 99"));
  CHECK_THAT(with([](nlohmann::json& k) { k["tokenizer"].erase("vocab_size"); }), Catch::Contains("tokenizer.vocab_size"));
  CHECK_THAT(with([](nlohmann::json& k) { k["shards"][0]["tokens"] = "many"; }),
             Catch::Contains("shards[0].tokens") && Catch::Contains("wrong type"));
  CHECK_THAT(with([](nlohmann::json& k) { k["shards"][0]["split"] = "test"; }), Catch::Contains("split is 'test'"));
  CHECK_THAT(with([](nlohmann::json& k) { k["shards"][0]["file"] = "../x.bin"; }), Catch::Contains("not a file name"));
  CHECK_THAT(with([](nlohmann::json& k) { k.erase("shards"); }), Catch::Contains("`shards`"));
}

// ---------------------------------------------------------------- loader

TEST_CASE("loader: permute is a bijection on 0..n-1", "[data]") {
  for (int64_t n : {1, 2, 3, 5, 16, 17, 100, 1000, 4097}) {
    for (uint64_t key : {0ull, 1ull, 0xdeadbeefull}) {
      std::vector<int> seen(size_t(n), 0);
      for (int64_t i = 0; i < n; ++i) {
        int64_t p = DataLoader::permute(i, n, key);
        REQUIRE(p >= 0);
        REQUIRE(p < n);
        ++seen[size_t(p)];
      }
      CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
    }
  }
  // Different keys give different orders.
  int same = 0;
  for (int64_t i = 0; i < 1000; ++i) same += DataLoader::permute(i, 1000, 1) == DataLoader::permute(i, 1000, 2);
  CHECK(same < 50);
}

TEST_CASE("loader: windows are deterministic and cover each epoch once with document starts", "[data]") {
  TempDir dir;
  const int64_t seq_len = 16, bos = 128000;
  // Token value = its position in the stream (so a window names its start), with BOS every 7..19
  // tokens; two train shards of unequal length and one val shard.
  std::mt19937 rng(5);
  auto stream = [&](int64_t n, uint32_t base) {
    std::vector<uint32_t> t;
    int64_t next_doc = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i == next_doc) {
        t.push_back(uint32_t(bos));
        next_doc += 7 + rng() % 13;
      } else {
        t.push_back(base + uint32_t(i));
      }
    }
    return t;
  };
  auto s0 = stream(16 * 20 + 1, 0), s1 = stream(16 * 13 + 9, 10000), v0 = stream(100, 50000);
  make_dataset(dir.path.string(), {{"train", s0}, {"train", s1}, {"val", v0}});
  const int64_t windows = 20 + 13;
  const int64_t G = 4;

  DataLoader a(data_at(dir.path.string()), seq_len, 128256, 7, "train", G);
  DataLoader b(data_at(dir.path.string()), seq_len, 128256, 7, "train", G);
  DataLoader other_seed(data_at(dir.path.string()), seq_len, 128256, 8, "train", G);
  CHECK(a.num_tokens() == int64_t(s0.size() + s1.size()));
  CHECK(a.num_windows() == windows);

  // Identify a window by (shard, start): the shard stream and the offset where it begins.
  auto locate = [&](const TokenWindow& w) -> std::pair<int, int64_t> {
    for (int s = 0; s < 2; ++s) {
      const auto& src = s == 0 ? s0 : s1;
      for (int64_t start = 0; start + seq_len < int64_t(src.size()); start += seq_len)
        if (std::equal(w.tokens.begin(), w.tokens.end(), src.begin() + start)) return {s, start};
    }
    return {-1, -1};
  };
  std::map<std::pair<int, int64_t>, int> epoch0, epoch1;
  int differs_from_other_seed = 0;
  for (int64_t step = 0; step * G < 2 * windows + 2 * G; ++step) {
    for (int64_t sample = 0; sample < G; ++sample) {
      TokenWindow w = a.window(step, sample);
      REQUIRE(w.tokens.size() == size_t(seq_len + 1));
      // Pure function of (seed, step, sample): same from another instance, and when asked again.
      CHECK(w.tokens == b.window(step, sample).tokens);
      CHECK(w.tokens == a.window(step, sample).tokens);
      differs_from_other_seed += w.tokens != other_seed.window(step, sample).tokens;
      auto where = locate(w);
      REQUIRE(where.first >= 0);
      int64_t i = step * G + sample;
      if (i < windows) ++epoch0[where];
      else if (i < 2 * windows) ++epoch1[where];
      // Document starts: independent scan of the inputs part.
      std::vector<int64_t> want{0};
      for (int64_t p = 1; p < seq_len; ++p)
        if (w.tokens[p] == bos) want.push_back(p);
      CHECK(w.doc_starts == want);
    }
  }
  CHECK(int64_t(epoch0.size()) == windows);  // every window once in epoch 0
  CHECK(int64_t(epoch1.size()) == windows);  // and again in epoch 1
  for (const auto& [k, v] : epoch0) CHECK(v == 1);
  CHECK(differs_from_other_seed > 0);
  CHECK(a.epoch_of(0) == 0);
  CHECK(a.epoch_of((windows + G - 1) / G) == 1);

  // Without the global batch: draws with replacement, still a pure function.
  DataLoader iid(data_at(dir.path.string()), seq_len, 128256, 7, "train");
  DataLoader iid2(data_at(dir.path.string()), seq_len, 128256, 7, "train");
  for (int64_t step = 0; step < 20; ++step) CHECK(iid.window(step, 3).tokens == iid2.window(step, 3).tokens);

  // The val split reads only val shards.
  DataLoader val(data_at(dir.path.string()), seq_len, 128256, 7, "val", G);
  CHECK(val.num_tokens() == 100);
  TokenWindow vw = val.window(0, 0);
  CHECK(std::all_of(vw.tokens.begin(), vw.tokens.end(), [](int32_t t) { return t >= 50000; }));
}

TEST_CASE("loader: synthetic data", "[data]") {
  DataConfig c;
  c.synthetic = true;
  DataLoader a(c, 64, 1000, 3, "train"), b(c, 64, 1000, 3, "train"), d(c, 64, 1000, 4, "train");
  TokenWindow w = a.window(5, 2);
  CHECK(w.tokens.size() == 65);
  CHECK(w.doc_starts == std::vector<int64_t>{0});
  CHECK(std::all_of(w.tokens.begin(), w.tokens.end(), [](int32_t t) { return t >= 0 && t < 1000; }));
  CHECK(w.tokens == b.window(5, 2).tokens);
  CHECK(w.tokens != a.window(5, 3).tokens);
  CHECK(w.tokens != d.window(5, 2).tokens);
  CHECK(a.num_tokens() == 0);
}

TEST_CASE("loader: bad data sets are one clear error", "[data][bad-input]") {
  TempDir dir;
  std::string d = dir.path.string();
  CHECK_THAT(error_of([&] { DataLoader(data_at(""), 16, 128256, 1, "train"); }), Catch::Contains("data.path"));
  CHECK_THAT(error_of([&] { DataLoader(data_at(d + "/none"), 16, 128256, 1, "train"); }),
             Catch::Contains("data set folder not found"));
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 128256, 1, "train"); }), Catch::Contains("manifest.json"));
  std::vector<uint32_t> tokens(100, 5);
  tokens[50] = 128255;
  Manifest m = make_dataset(d, {{"train", tokens}});
  // The model's vocabulary is smaller than the data's.
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 32000, 1, "train"); }), Catch::Contains("vocab_size"));
  // No val split; a window longer than any shard.
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 128256, 1, "val"); }), Catch::Contains("no val shards"));
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 100, 128256, 1, "train"); }), Catch::Contains("seq_len + 1 = 101"));
  // A shard replaced by one with another token count, magic or version.
  std::string shard = (dir.path / m.shards[0].file).string();
  std::vector<uint32_t> shorter(90, 5);
  shard_write(shard, shorter.data(), 90);
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 128256, 1, "train"); }), Catch::Contains("the manifest says 100"));
  write_raw_shard(shard, 20240801, 8, 100, std::string(400, '\0'));
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 128256, 1, "train"); }), Catch::Contains("version 8"));
  write_raw_shard(shard, 1, 7, 100, std::string(400, '\0'));
  CHECK_THAT(error_of([&] { DataLoader(data_at(d), 16, 128256, 1, "train"); }), Catch::Contains("not a token shard"));
  // A shard whose tokens exceed what its manifest entry claims: caught when the window is read.
  std::vector<uint32_t> big(100, 200000);
  shard_write(shard, big.data(), 100);
  DataLoader lying(data_at(d), 16, 128256, 1, "train");
  CHECK_THAT(error_of([&] { lying.window(0, 0); }), Catch::Contains("outside the model's vocab_size"));
}

// ---------------------------------------------------------------- prepare-data

namespace {

PrepareDataOptions options(const std::vector<std::string>& inputs, const std::string& out) {
  PrepareDataOptions o;
  o.inputs = inputs;
  o.out_dir = out;
  o.tokenizer_path = test::llama3_tokenizer_path();
  o.progress = false;
  o.threads = 2;
  return o;
}

// Every token of a split, shard after shard.
std::vector<int32_t> split_tokens(const std::string& dir, const std::string& split) {
  Manifest m = manifest_read(dir);
  std::vector<int32_t> out;
  for (const auto& s : m.shards) {
    if (s.split != split) continue;
    ShardFile f = ShardFile::open((fs::path(dir) / s.file).string());
    size_t at = out.size();
    out.resize(at + size_t(f.num_tokens()));
    f.copy(0, f.num_tokens(), out.data() + at);
  }
  return out;
}

}  // namespace

TEST_CASE("prepare-data: txt and jsonl and json inputs become BOS-prefixed documents in order", "[data]") {
  const Tokenizer& tok = test::llama3();
  TempDir in, out;
  in.write("a/one.txt", "First document.\nSecond line of it.\n");
  in.write("a/two.txt", "Another file, another document.");
  in.write("b.jsonl", "{\"text\": \"json line one\", \"id\": 1}\n\n{\"text\": \"caf\\u00e9 <|begin_of_text|> two\"}\n");
  in.write("c.json", R"(["sentence one", "", "sentence two", {"text": "object text"}])");
  in.write("ignored.md", "not an input type inside a folder");
  PrepareDataOptions o = options({(in.path / "a").string(), in.file("b.jsonl"), in.file("c.json")}, out.path.string());
  o.val_fraction = 0;
  PrepareDataResult r = prepare_data(o);
  CHECK(!r.up_to_date);
  CHECK(r.files == 4);
  CHECK(r.train_documents == 7);
  CHECK(r.empty_documents == 1);
  CHECK(r.val_documents == 0);
  // Independent expectation: BOS + encode(text) per document, in input order.
  std::vector<int32_t> want;
  for (const std::string& text : {std::string("First document.\nSecond line of it.\n"),
                                   std::string("Another file, another document."), std::string("json line one"),
                                   std::string("caf\xc3\xa9 <|begin_of_text|> two"), std::string("sentence one"),
                                   std::string("sentence two"), std::string("object text")}) {
    want.push_back(128000);
    for (int32_t id : tok.encode(text)) want.push_back(id);
  }
  CHECK(split_tokens(out.path.string(), "train") == want);
  Manifest m = manifest_read(out.path.string());
  CHECK(m.tokenizer_sha256 == tok.sha256());
  CHECK(m.vocab_size == 128256);
  CHECK(m.bos_id == 128000);
  CHECK(m.split_documents("train") == 7);
  CHECK_NOTHROW(dataset_verify(out.path.string(), m, true));
  // And the loader reads it.
  DataLoader loader(data_at(out.path.string()), 8, 128256, 1, "train", 2);
  CHECK(loader.num_tokens() == int64_t(want.size()));
}

TEST_CASE("prepare-data: blank-line txt blocks and shards and val split with any thread count", "[data]") {
  TempDir in, out1, out2;
  std::string text;
  std::vector<std::string> blocks;
  for (int i = 0; i < 300; ++i) {
    std::string b = "Block " + std::to_string(i) + " line one.\nline two of block " + std::to_string(i) + ".";
    blocks.push_back(b);
    text += b + (i % 3 == 0 ? "\n\n" : i % 3 == 1 ? "\n  \t\n\n" : "\n\r\n");
  }
  in.write("blocks.txt", text);
  PrepareDataOptions o = options({in.file("blocks.txt")}, out1.path.string());
  o.txt_documents = "blank-line";
  o.val_fraction = 0.2;
  o.shard_tokens = 500;
  o.threads = 1;
  PrepareDataResult r1 = prepare_data(o);
  CHECK(r1.train_documents + r1.val_documents == 300);
  CHECK(r1.val_documents > 30);
  CHECK(r1.val_documents < 100);
  CHECK(r1.train_shards == (r1.train_tokens + 499) / 500);
  Manifest m = manifest_read(out1.path.string());
  for (size_t i = 0; i < m.shards.size(); ++i) {
    bool last_of_split = true;
    for (size_t j = i + 1; j < m.shards.size(); ++j) last_of_split &= m.shards[j].split != m.shards[i].split;
    if (!last_of_split) CHECK(m.shards[i].tokens == 500);
  }
  // Each block is one document: the documents decode back to the blocks (train and val together).
  const Tokenizer& tok = test::llama3();
  std::multiset<std::string> decoded;
  for (const char* split : {"train", "val"}) {
    std::vector<int32_t> t = split_tokens(out1.path.string(), split);
    std::vector<int32_t> doc;
    for (size_t i = 0; i <= t.size(); ++i) {
      if (i == t.size() || t[i] == 128000) {
        if (!doc.empty()) decoded.insert(tok.decode(doc));
        doc.clear();
      } else {
        doc.push_back(t[i]);
      }
    }
  }
  std::multiset<std::string> want;
  for (const auto& b : blocks) want.insert(b);
  CHECK(decoded.size() == 300);
  // Blocks keep their own text; the "\r" of a CRLF blank line is not part of the block.
  CHECK(decoded == want);
  // Same output with 3 threads.
  o.out_dir = out2.path.string();
  o.threads = 3;
  PrepareDataResult r2 = prepare_data(o);
  CHECK(r2.val_documents == r1.val_documents);
  CHECK(split_tokens(out1.path.string(), "train") == split_tokens(out2.path.string(), "train"));
  CHECK(split_tokens(out1.path.string(), "val") == split_tokens(out2.path.string(), "val"));
}

TEST_CASE("prepare-data: re-runs are safe (up to date / leftovers / failures keep the old data set)", "[data]") {
  TempDir in, out;
  in.write("docs.json", R"(["alpha beta", "gamma delta", "epsilon"])");
  PrepareDataOptions o = options({in.file("docs.json")}, out.path.string());
  o.val_fraction = 0;
  prepare_data(o);
  Manifest first = manifest_read(out.path.string());
  CHECK(prepare_data(o).up_to_date);

  // Leftovers of an interrupted run: an orphan shard and temporary files. A forced re-run removes
  // them and produces the same tokens.
  out.write("train_deadbeef_000000.bin", "partial");
  out.write("train_deadbeef_000001.bin.tmp.999", "partial");
  out.write("manifest.json.tmp.999", "{");
  out.write("notes.txt", "a user's file");
  std::vector<int32_t> before = split_tokens(out.path.string(), "train");
  o.force = true;
  PrepareDataResult r = prepare_data(o);
  CHECK(!r.up_to_date);
  CHECK(split_tokens(out.path.string(), "train") == before);
  CHECK(!fs::exists(out.path / "train_deadbeef_000000.bin"));
  CHECK(!fs::exists(out.path / "train_deadbeef_000001.bin.tmp.999"));
  CHECK(!fs::exists(out.path / "manifest.json.tmp.999"));
  CHECK(fs::exists(out.path / "notes.txt"));
  for (const auto& s : first.shards) CHECK(!fs::exists(out.path / s.file));  // the replaced data set's shards

  // A run that fails half-way (the second input is broken) leaves the finished data set as it was.
  Manifest good = manifest_read(out.path.string());
  in.write("z_broken.json", "[\"fine\", ");
  o.inputs = {in.file("docs.json"), in.file("z_broken.json")};
  CHECK_THAT(error_of([&] { prepare_data(o); }), Catch::Contains("z_broken.json") && Catch::Contains("not valid JSON"));
  Manifest after = manifest_read(out.path.string());
  CHECK(manifest_to_json(after) == manifest_to_json(good));
  CHECK_NOTHROW(dataset_verify(out.path.string(), after, true));
  size_t bins = 0;
  for (const auto& e : fs::directory_iterator(out.path)) bins += e.path().extension() == ".bin";
  CHECK(bins == good.shards.size());  // the failed run's shards are gone

  // A changed input makes the data set out of date.
  o.inputs = {in.file("docs.json")};
  o.force = false;
  in.write("docs.json", R"(["alpha beta", "gamma delta", "epsilon", "zeta"])");
  PrepareDataResult changed = prepare_data(o);
  CHECK(!changed.up_to_date);
  CHECK(changed.train_documents == 4);
}

TEST_CASE("prepare-data: bad inputs are one clear error and write no manifest", "[data][bad-input]") {
  TempDir in, out;
  std::string o_dir = out.file("set");
  auto error_for = [&](const std::vector<std::string>& inputs, const std::string& field = "text") {
    PrepareDataOptions o = options(inputs, o_dir);
    o.text_field = field;
    std::string e = error_of([&] { prepare_data(o); });
    CHECK(!fs::exists(fs::path(o_dir) / "manifest.json"));
    CHECK(e.find('\n') == std::string::npos);
    return e;
  };
  CHECK_THAT(error_for({in.file("missing.txt")}), Catch::Contains("missing.txt") && Catch::Contains("not found"));
  CHECK_THAT(error_for({in.path.string() + "/*.nothing"}), Catch::Contains("matches no file"));
  in.write("empty_dir/readme.md", "x");
  CHECK_THAT(error_for({in.file("empty_dir")}), Catch::Contains("no .txt, .jsonl or .json files"));
  CHECK_THAT(error_for({in.write("doc.pdf", "%PDF")}), Catch::Contains("unsupported input type '.pdf'"));
  CHECK_THAT(error_for({in.write("bad.json", "{\"a\": ")}), Catch::Contains("bad.json") && Catch::Contains("not valid JSON"));
  CHECK_THAT(error_for({in.write("obj.json", "{\"a\": 1}")}), Catch::Contains("top level is a JSON object"));
  CHECK_THAT(error_for({in.write("nums.json", "[\"ok\", 3]")}), Catch::Contains("element 1 is a number"));
  CHECK_THAT(error_for({in.write("bad.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{oops}\n")}),
             Catch::Contains("bad.jsonl:3") && Catch::Contains("not valid JSON"));
  CHECK_THAT(error_for({in.write("field.jsonl", "{\"body\": \"a\"}\n")}),
             Catch::Contains("field.jsonl:1") && Catch::Contains("no string field \"text\"") && Catch::Contains("--text-field"));
  PrepareDataOptions right_field = options({in.file("field.jsonl")}, o_dir);
  right_field.text_field = "body";  // the right field name fixes it
  right_field.val_fraction = 0;
  CHECK_NOTHROW(prepare_data(right_field));
  fs::remove_all(o_dir);
  std::string not_a_tokenizer = in.write("tok.json", "[1, 2]");
  PrepareDataOptions o = options({in.write("ok.txt", "fine")}, o_dir);
  o.tokenizer_path = not_a_tokenizer;
  CHECK_THAT(error_of([&] { prepare_data(o); }), Catch::Contains("tok.json") && Catch::Contains("not an HF tokenizer.json"));
}

TEST_CASE("prepare-data: invalid UTF-8 is replaced and counted", "[data]") {
  TempDir in, out;
  in.write("bad.txt", "ok \xff\xfe text");
  PrepareDataOptions o = options({in.file("bad.txt")}, out.path.string());
  o.val_fraction = 0;
  PrepareDataResult r = prepare_data(o);
  CHECK(r.utf8_replaced_documents == 1);
  std::vector<int32_t> want{128000};
  for (int32_t id : test::llama3().encode("ok \xEF\xBF\xBD\xEF\xBF\xBD text")) want.push_back(id);
  CHECK(split_tokens(out.path.string(), "train") == want);
}

TEST_CASE("CLI: bad input exits with code 2 and one line", "[data][bad-input][cli]") {
  TempDir tmp;
  std::string err;
  std::string tok = " --tokenizer " + test::llama3_tokenizer_path();
  CHECK(run_flexcp("prepare-data " + tmp.file("missing.jsonl") + " --out " + tmp.file("o") + tok, err) == 2);
  CHECK_THAT(err, Catch::StartsWith("error: ") && Catch::Contains("missing.jsonl"));
  CHECK(std::count(err.begin(), err.end(), '\n') == 1);
  CHECK(run_flexcp("tokenize --tokenizer " + tmp.write("t.json", "{}") + " hello", err) == 2);
  CHECK(std::count(err.begin(), err.end(), '\n') == 1);
  CHECK(run_flexcp("tokenize" + tok + " --ids-only 'Hello world'", err) == 0);
}
