// Token shards and the data set manifest (/work/shared/docs/data-format.md, docs/data.md).
//
// A shard is llm.c's format: a header of 256 little-endian int32 (magic, version, token count, then
// zeros) and the tokens. Llama 3 shards (magic 20240801, version 7) hold uint32 tokens; llm.c's
// GPT-2 shards (20240520, version 1, uint16) can be read too.
//
// A data set is a folder of shards plus manifest.json, written last and atomically by
// `flexcp prepare-data`: readers trust only what a complete manifest lists, so an interrupted run
// never passes for a finished one.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace flexcp {

constexpr int32_t kShardMagicLlama3 = 20240801;
constexpr int32_t kShardVersionLlama3 = 7;
constexpr int32_t kShardMagicGpt2 = 20240520;
constexpr int32_t kShardVersionGpt2 = 1;
constexpr int64_t kShardHeaderInts = 256;
constexpr int64_t kShardHeaderBytes = kShardHeaderInts * 4;

struct ShardWriteResult {
  int64_t tokens = 0;
  int64_t max_token_id = -1;
  std::string sha256;  // of the whole file, as `sha256sum` prints it
};

// Writes a Llama 3 shard (uint32 tokens) atomically: temporary file, fsync, rename.
ShardWriteResult shard_write(const std::string& path, const uint32_t* tokens, int64_t count);

// A read-only memory map of one shard. open() checks the magic, the version and that the file size
// equals header + count * token size; each failure is a UserError naming the file.
class ShardFile {
 public:
  static ShardFile open(const std::string& path);
  ShardFile() = default;
  ~ShardFile();
  ShardFile(ShardFile&& other) noexcept;
  ShardFile& operator=(ShardFile&& other) noexcept;
  ShardFile(const ShardFile&) = delete;
  ShardFile& operator=(const ShardFile&) = delete;

  const std::string& path() const { return path_; }
  int32_t magic() const { return magic_; }
  int64_t num_tokens() const { return num_tokens_; }
  int token_bytes() const { return token_bytes_; }  // 4 (Llama 3) or 2 (GPT-2)
  uint32_t token(int64_t i) const;
  // Copies tokens [start, start + count) into out (the caller checks the range).
  void copy(int64_t start, int64_t count, int32_t* out) const;

 private:
  std::string path_;
  const unsigned char* data_ = nullptr;  // whole file
  size_t size_ = 0;
  int32_t magic_ = 0;
  int64_t num_tokens_ = 0;
  int token_bytes_ = 4;
};

struct ManifestShard {
  std::string file;   // name inside the data set folder
  std::string split;  // "train" or "val"
  int64_t tokens = 0;
  int64_t documents = 0;     // documents that start in this shard
  int64_t max_token_id = -1;
  std::string sha256;
};

struct Manifest {
  static constexpr int kFormatVersion = 1;
  int format_version = kFormatVersion;
  std::string created_by;
  std::string tokenizer_name;
  std::string tokenizer_sha256;
  int64_t vocab_size = 0;  // of the tokenizer
  int64_t bos_id = -1;     // every document starts with this id; -1 when unknown
  int64_t eos_id = -1;
  int32_t shard_magic = kShardMagicLlama3;
  int32_t shard_version = kShardVersionLlama3;
  std::vector<ManifestShard> shards;
  nlohmann::json prepare;  // how it was made: inputs, settings, fingerprint, counts (informational)

  int64_t split_tokens(const std::string& split) const;
  int64_t split_documents(const std::string& split) const;
  int64_t split_shards(const std::string& split) const;
};

nlohmann::ordered_json manifest_to_json(const Manifest& m);  // keys in reading order
// `where` names the file in error messages.
Manifest manifest_from_json(const nlohmann::json& j, const std::string& where);
// Reads <dir>/manifest.json; throws UserError (missing folder, missing manifest, not JSON, missing
// or mistyped field, unknown format version).
Manifest manifest_read(const std::string& dir);
// Writes <dir>/manifest.json atomically.
void manifest_write(const std::string& dir, const Manifest& m);

// Checks that each shard the manifest lists exists with the right header, size and token count,
// and with `checksums` also its SHA-256. Throws UserError naming the first bad shard.
void dataset_verify(const std::string& dir, const Manifest& m, bool checksums);

}  // namespace flexcp
