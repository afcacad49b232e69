// Small helpers shared by the unit tests: temporary folders, whole-file reads and writes, and
// catching the one-line UserError that bad input must produce.
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

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

// A free TCP port on the loopback interface (bound, read back, released), for rendezvous tests.
inline int free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// Runs cmd with /bin/sh: its exit code (-1 when it did not exit normally) and its standard output
// and standard error together.
inline std::pair<int, std::string> shell_run(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

#ifdef FLEXCP_BINARY
// One run of the flexcp binary: exit code, standard output and standard error kept apart.
struct CliRun {
  int rc = -1;
  std::string out, err;
};

// Runs `flexcp ARGS` with optional environment assignments in front (e.g. "FLEXCP_GNUPLOT="); its
// output goes through files in dir.
inline CliRun cli_run(const std::string& args, const std::filesystem::path& dir, const std::string& env = "") {
  const std::filesystem::path out = dir / "cli.out", err = dir / "cli.err";
  const std::string cmd =
      env + " '" + std::string(FLEXCP_BINARY) + "' " + args + " >'" + out.string() + "' 2>'" + err.string() + "'";
  const int status = std::system(cmd.c_str());
  CliRun c;
  c.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  c.out = read_text(out);
  c.err = read_text(err);
  return c;
}
#endif

}  // namespace flexcp::test
