// Files written whole or not at all: the bytes go to "<path>.tmp-<pid>" in the same folder, are
// fsynced, renamed over <path>, and the folder is fsynced. A crash leaves the old file (or none)
// plus at most a *.tmp-* leftover, never a half-written <path>.
#pragma once
#include <cstdio>
#include <string>
#include <string_view>

namespace flexcp {

class AtomicFileWriter {
 public:
  // Creates the temporary file; throws UserError naming `path` when it cannot.
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();  // removes the temporary file unless commit() ran
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t size);
  void write(std::string_view s) { write(s.data(), s.size()); }
  // fsync, rename into place, fsync the folder. Throws UserError on any failure (disk full...).
  void commit();
  const std::string& temp_path() const { return temp_path_; }

 private:
  std::string path_, temp_path_;
  FILE* file_ = nullptr;
  bool committed_ = false;
};

void file_write_atomic(const std::string& path, std::string_view bytes);

// True for names that AtomicFileWriter leaves behind when a process dies mid-write.
bool file_is_atomic_leftover(const std::string& name);

}  // namespace flexcp
