// Shared by the libFuzzer targets: a per-process scratch file for readers that take a path.
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace flexcp_fuzz {

// Path of this process's scratch file (in $TMPDIR, or /tmp), removed at exit.
inline const std::string& scratch_path(const char* tag) {
  static const std::string path = [tag] {
    const char* dir = std::getenv("TMPDIR");
    std::string p = std::string(dir && *dir ? dir : "/tmp") + "/flexcp_fuzz_" + tag + "_" + std::to_string(::getpid());
    static std::string to_remove = p;
    std::atexit([] { ::unlink(to_remove.c_str()); });
    return p;
  }();
  return path;
}

// Replaces the scratch file's contents with the fuzz input.
inline const std::string& scratch_write(const char* tag, const uint8_t* data, size_t size) {
  const std::string& p = scratch_path(tag);
  const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return p;
}

}  // namespace flexcp_fuzz
