#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/errors.h"

namespace flexcp {
namespace {

void fsync_folder(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // best effort: some file systems refuse to open folders
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

AtomicFileWriter::AtomicFileWriter(const std::string& path)
    : path_(path), temp_path_(path + ".tmp-" + std::to_string(::getpid())) {
  file_ = std::fopen(temp_path_.c_str(), "wb");
  if (!file_) fail(path, std::string("cannot create file: ") + std::strerror(errno), "check the folder exists and is writable");
}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_) std::fclose(file_);
  if (!committed_) std::remove(temp_path_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t size) {
  if (size > 0 && std::fwrite(data, 1, size, file_) != size)
    fail(path_, std::string("write failed: ") + std::strerror(errno), "check free disk space");
}

void AtomicFileWriter::commit() {
  bool ok = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  int err = errno;
  ok = (std::fclose(file_) == 0) && ok;
  file_ = nullptr;
  if (!ok) fail(path_, std::string("write failed: ") + std::strerror(err), "check free disk space");
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0)
    fail(path_, std::string("cannot rename the finished file into place: ") + std::strerror(errno));
  committed_ = true;
  fsync_folder(path_);
}

void file_write_atomic(const std::string& path, std::string_view bytes) {
  AtomicFileWriter w(path);
  w.write(bytes);
  w.commit();
}

bool file_is_atomic_leftover(const std::string& name) { return name.find(".tmp-") != std::string::npos; }

}  // namespace flexcp
