// Atomic file writes: a reader (or a crash) sees either the old file or the complete new one, never a
// torn one. Bytes go to "<path>.tmp.<pid>" in the same folder, which is fsync'ed, renamed over
// <path>, and the folder fsync'ed so the rename itself survives a power cut.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace flexcp {

// Writes `bytes` to `path` atomically. Throws UserError (naming the path and the OS reason) when the
// folder is missing or not writable, or the disk is full.
void write_file_atomic(const std::string& path, std::string_view bytes);

// Streaming form for large files (checkpoints): write() any number of times, then commit(). Without
// commit() (an exception, an early return) the destructor removes the temporary and leaves `path`
// untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  // Flushes, fsyncs, renames over the destination and fsyncs the folder. Call once.
  void commit();
  // Discards what was written so far (also what the destructor does without commit()).
  void abort() noexcept;

  const std::string& path() const { return path_; }
  std::size_t bytes_written() const { return written_; }

 private:
  void flush_buffer();
  void write_all(const char* data, std::size_t size);

  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  std::string buffer_;  // small writes are gathered so a tensor-by-tensor writer makes few syscalls
  std::size_t written_ = 0;
};

}  // namespace flexcp
