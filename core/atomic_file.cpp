#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "core/errors.h"

namespace flexcp {
namespace {

constexpr std::size_t kBufferBytes = 1 << 20;

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

[[noreturn]] void fail_errno(const std::string& path, const std::string& action, int err) {
  fail(path, action + ": " + std::strerror(err), "check that the folder exists, is writable and has free space");
}

// Makes the rename durable. Some file systems refuse fsync on a directory (EINVAL): that is fine,
// the rename is then as durable as that file system can make it.
void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  tmp_path_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_errno(path_, "cannot create " + tmp_path_, errno);
  buffer_.reserve(kBufferBytes);
}

AtomicFileWriter::~AtomicFileWriter() { abort(); }

void AtomicFileWriter::abort() noexcept {
  if (fd_ < 0) return;
  ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::write_all(const char* p, std::size_t left) {
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      abort();
      fail_errno(path_, "cannot write", err);
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

void AtomicFileWriter::flush_buffer() {
  write_all(buffer_.data(), buffer_.size());
  buffer_.clear();
}

void AtomicFileWriter::write(const void* data, std::size_t size) {
  if (fd_ < 0) throw std::logic_error(path_ + ": AtomicFileWriter::write after commit or abort");
  const char* bytes = static_cast<const char*>(data);
  written_ += size;
  if (buffer_.size() + size <= kBufferBytes) {
    buffer_.append(bytes, size);
    return;
  }
  flush_buffer();
  if (size < kBufferBytes) {
    buffer_.append(bytes, size);
    return;
  }
  write_all(bytes, size);  // a large block (a tensor) goes straight from the caller's memory
}

void AtomicFileWriter::commit() {
  if (fd_ < 0) throw std::logic_error(path_ + ": AtomicFileWriter::commit after commit or abort");
  flush_buffer();
  if (::fsync(fd_) != 0) {
    const int err = errno;
    abort();
    fail_errno(path_, "cannot fsync " + tmp_path_, err);
  }
  if (::close(fd_) != 0) {
    const int err = errno;
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
    fail_errno(path_, "cannot close " + tmp_path_, err);
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_path_.c_str());
    fail_errno(path_, "cannot rename " + tmp_path_ + " over it", err);
  }
  fsync_dir(parent_dir(path_));
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFileWriter w(path);
  w.write(bytes);
  w.commit();
}

}  // namespace flexcp
