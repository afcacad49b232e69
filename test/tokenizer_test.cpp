// The tokenizer against the HF `tokenizers` library (goldens made by
// test/fixtures/make_tokenizer_goldens.py), plus the parts HF cannot check: invalid UTF-8 policy,
// the two merge algorithms, thread safety and bad tokenizer files.
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>
#include <unistd.h>

#include "core/errors.h"
#include "core/tokenizer.h"
#include "test/data_fixtures.h"

using namespace flexcp;
namespace fs = std::filesystem;

namespace {

using test::error_of;
using test::llama3;
using test::TempDir;

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(char(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

nlohmann::json goldens() {
  std::ifstream in(std::string(FLEXCP_SOURCE_DIR) + "/test/fixtures/tokenizer/goldens.json");
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("tokenizer: ids equal HF tokenizers on every golden case", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  nlohmann::json g = goldens();
  REQUIRE(g["tokenizer_sha256"] == tok.sha256());
  const auto& cases = g["cases"];
  REQUIRE(cases.size() > 700);
  int mismatches = 0;
  for (const auto& c : cases) {
    std::string input = c.contains("hex") ? from_hex(c["hex"]) : c["text"].get<std::string>();
    std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> got = tok.encode(input, c["allow_special"].get<bool>());
    if (got != want) {
      ++mismatches;
      INFO("case " << c["name"].get<std::string>());
      CHECK(got == want);
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("tokenizer: decode(encode(text)) gives the text back", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  nlohmann::json g = goldens();
  for (const auto& c : g["cases"]) {
    INFO("case " << c["name"].get<std::string>());
    std::vector<int32_t> ids = c["ids"].get<std::vector<int32_t>>();
    if (c.contains("hex")) {
      // Invalid UTF-8 comes back with U+FFFD where the ill-formed bytes were.
      std::string raw = from_hex(c["hex"]), storage;
      CHECK(tok.decode(ids) == std::string(utf8_sanitize(raw, storage)));
    } else {
      CHECK(tok.decode(ids) == c["text"].get<std::string>());
    }
  }
}

TEST_CASE("tokenizer: the golden set covers what the issue lists", "[tokenizer]") {
  nlohmann::json g = goldens();
  std::set<std::string> names;
  for (const auto& c : g["cases"]) names.insert(c["name"]);
  for (const char* n : {"empty", "sentence", "python", "cpp", "digits", "decimals", "spaces", "long_spaces", "newlines",
                        "contractions", "contractions_upper", "cjk_zh", "cjk_ja", "cjk_ko", "emoji", "emoji_zwj",
                        "combining", "zalgo", "long_letters", "long_word", "long_cjk", "bad_mixed", "special_plain",
                        "special_allowed", "corpus_000", "random_000"})
    CHECK(names.count(n) == 1);
}

TEST_CASE("tokenizer: vocabulary facts of Llama 3", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  CHECK(tok.vocab_size() == 128256);
  CHECK(tok.bos_id() == 128000);
  CHECK(tok.eos_id() == 128001);
  CHECK(tok.special_id("<|eot_id|>") == 128009);
  CHECK(tok.special_id("<|reserved_special_token_250|>") == 128255);
  CHECK(tok.special_id("hello") == -1);
  CHECK(tok.token_bytes(128000) == "<|begin_of_text|>");
  CHECK(tok.encode("").empty());
  // Special-token text is text unless allowed.
  CHECK(tok.encode("<|begin_of_text|>").size() > 1);
  CHECK(tok.encode("<|begin_of_text|>", true) == std::vector<int32_t>{128000});
  CHECK_THROWS_AS(tok.token_bytes(128256), UserError);
  CHECK_THROWS_AS(tok.token_bytes(-1), UserError);
}

TEST_CASE("tokenizer: invalid UTF-8 is replaced per maximal subpart as Python does", "[tokenizer]") {
  std::string storage;
  int64_t replaced = -1;
  std::string valid = "plain ascii and \xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80";
  std::string_view out = utf8_sanitize(valid, storage, &replaced);
  CHECK(out.data() == valid.data());  // valid input is not copied
  CHECK(replaced == 0);
  // The Unicode standard's example (chapter 3, "U+FFFD substitution of maximal subparts"):
  // 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64 -> a FFFD FFFD FFFD b FFFD c FFFD FFFD d.
  std::string bad = "\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64";
  const std::string R = "\xEF\xBF\xBD";
  CHECK(std::string(utf8_sanitize(bad, storage, &replaced)) == "a" + R + R + R + "b" + R + "c" + R + R + "d");
  CHECK(replaced == 6);
  // Surrogates, overlongs and code points above U+10FFFF: each byte is its own maximal subpart.
  CHECK(std::string(utf8_sanitize("\xed\xa0\x80", storage)) == R + R + R);
  CHECK(std::string(utf8_sanitize("\xc0\xaf", storage)) == R + R);
  CHECK(std::string(utf8_sanitize("\xf4\x90\x80\x80", storage)) == R + R + R + R);
  CHECK(std::string(utf8_sanitize("x\xf0\x9f\x98", storage)) == "x" + R);  // truncated at the end
  // encode() applies the same policy.
  const Tokenizer& tok = llama3();
  CHECK(tok.encode(bad) == tok.encode("a" + R + R + R + "b" + R + "c" + R + R + "d"));
}

TEST_CASE("tokenizer: the scan and heap merge algorithms agree", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  std::mt19937 rng(42);
  const std::string alphabets[] = {"abcdefghijklmnopqrstuvwxyz", "aaaaab", "etaoin shrdlu", "0123456789",
                                   "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e"};
  for (int trial = 0; trial < 400; ++trial) {
    const std::string& a = alphabets[trial % 5];
    size_t len = 2 + rng() % (trial < 300 ? 40 : 400);
    std::string piece;
    for (size_t i = 0; i < len; ++i) piece.push_back(a[rng() % a.size()]);
    if (trial % 5 == 4) piece = piece.substr(0, piece.size() / 3 * 3);  // whole CJK characters
    if (piece.size() < 2) continue;
    INFO("piece " << piece);
    std::vector<int32_t> scan = tokenizer_bpe_for_test(tok, piece, false);
    std::vector<int32_t> heap = tokenizer_bpe_for_test(tok, piece, true);
    REQUIRE(scan == heap);
    CHECK(tok.decode(scan) == piece);
  }
}

TEST_CASE("tokenizer: long inputs of one character class", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  for (const std::string& unit : {std::string("a"), std::string(" "), std::string("\n"), std::string("!"),
                                  std::string("7"), std::string("\xe6\x97\xa5")}) {
    std::string text;
    for (int i = 0; i < 200000; ++i) text += unit;
    std::vector<int32_t> ids = tok.encode(text);
    INFO("unit '" << unit << "'");
    CHECK(!ids.empty());
    CHECK(tok.decode(ids) == text);
  }
}

TEST_CASE("tokenizer: threads share one tokenizer and get the same ids", "[tokenizer]") {
  const Tokenizer& tok = llama3();
  nlohmann::json g = goldens();
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> want;
  for (const auto& c : g["cases"]) {
    if (c.contains("hex") || c["allow_special"].get<bool>()) continue;
    texts.push_back(c["text"]);
    want.push_back(c["ids"].get<std::vector<int32_t>>());
  }
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round)
        for (size_t i = t; i < texts.size() + t; ++i) {
          size_t k = i % texts.size();
          if (tok.encode(texts[k]) != want[k]) ++bad;
        }
    });
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
}

TEST_CASE("tokenizer: bad tokenizer files give one clear line", "[tokenizer][bad-input]") {
  TempDir dir;
  std::string missing = (dir.path / "nope.json").string();
  CHECK_THAT(error_of([&] { Tokenizer::load(missing); }), Catch::Contains(missing) && Catch::Contains("not found"));
  std::string not_json = dir.write("tokenizer.model", std::string("\x0a\x0b\x08\x01\xff binary sentencepiece", 26));
  CHECK_THAT(error_of([&] { Tokenizer::load(not_json); }), Catch::Contains(not_json) && Catch::Contains("not a JSON file"));
  std::string other = dir.write("config.json", R"({"architectures": ["LlamaForCausalLM"]})");
  CHECK_THAT(error_of([&] { Tokenizer::load(other); }), Catch::Contains("not an HF tokenizer.json"));
  std::string wordpiece = dir.write("wp.json", R"({"model": {"type": "WordPiece", "vocab": {}}})");
  CHECK_THAT(error_of([&] { Tokenizer::load(wordpiece); }), Catch::Contains("model.type is 'WordPiece'"));
  std::string unigram = dir.write("ug.json", R"({"model": {"type": "Unigram", "vocab": []}})");
  CHECK_THAT(error_of([&] { Tokenizer::load(unigram); }), Catch::Contains("model.type is 'Unigram'"));
  std::string no_pre = dir.write("bpe.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": null})");
  CHECK_THAT(error_of([&] { Tokenizer::load(no_pre); }), Catch::Contains("pre_tokenizer"));
  for (const std::string& msg : {error_of([&] { Tokenizer::load(not_json); }), error_of([&] { Tokenizer::load(wordpiece); })})
    CHECK(msg.find('\n') == std::string::npos);
}
