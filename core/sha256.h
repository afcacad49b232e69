// SHA-256 of files and buffers, for the content hashes in manifest.json (the tokenizer file and each
// shard). Hex digests match `sha256sum`, so a user can check a data set with standard tools.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace flexcp {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  void update(std::string_view s) { update(s.data(), s.size()); }
  std::string hex_digest();  // finishes the hash; call once

 private:
  void compress(const uint8_t* block);
  uint32_t state_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string sha256_hex(std::string_view data);
// Throws UserError naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace flexcp
