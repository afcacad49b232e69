// Small helpers shared by the unit tests: temporary folders, whole-file reads and writes, and
// catching the one-line UserError that bad input must produce.
#pragma once
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>
#include <string>

#include "core/errors.h"

namespace flexcp::test {

// A fresh folder under the system temp dir, removed with everything in it when the test ends.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("flexcp_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes `content` to path/name (creating sub-folders) and returns the file's path.
  std::string write(const std::string& name, const std::string& content) const;
};

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Writes the bytes of `text` to p, creating its folder; replaces an existing file.
inline void write_text(const std::filesystem::path& p, const std::string& text) {
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

inline std::string TempDir::write(const std::string& name, const std::string& content) const {
  write_text(path / name, content);
  return file(name);
}

// The message of the UserError that fn throws; fails the test if it throws nothing or something else.
inline std::string user_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected UserError, got another exception: " << e.what());
  }
  FAIL("expected UserError, nothing was thrown");
  return {};
}

// msg contains every one of parts and is one line.
inline void require_contains(const std::string& msg, std::initializer_list<std::string> parts) {
  INFO("message: " << msg);
  for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
  CHECK(msg.find('\n') == std::string::npos);
}

}  // namespace flexcp::test
