#include "core/token_shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/errors.h"
#include "core/sha256.h"

namespace flexcp {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "shards are little-endian; so is every machine we build for");

std::string join(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

}  // namespace

ShardWriteResult shard_write(const std::string& path, const uint32_t* tokens, int64_t count) {
  if (count > INT32_MAX)
    fail(path, "a shard holds at most 2^31-1 tokens (its header count is an int32)", "lower --shard-tokens");
  int32_t header[kShardHeaderInts] = {};
  header[0] = kShardMagicLlama3;
  header[1] = kShardVersionLlama3;
  header[2] = int32_t(count);
  ShardWriteResult r;
  r.tokens = count;
  for (int64_t i = 0; i < count; ++i) r.max_token_id = std::max<int64_t>(r.max_token_id, tokens[i]);
  Sha256 h;
  h.update(header, sizeof header);
  h.update(tokens, size_t(count) * 4);
  r.sha256 = h.hex_digest();
  AtomicFileWriter w(path);
  w.write(header, sizeof header);
  w.write(tokens, size_t(count) * 4);
  w.commit();
  return r;
}

ShardFile ShardFile::open(const std::string& path) {
  ShardFile s;
  s.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    if (errno == ENOENT) fail(path, "shard not found", "the data set is incomplete: run flexcp prepare-data again");
    fail(path, std::string("cannot open shard: ") + std::strerror(errno));
  }
  struct stat st {};
  ::fstat(fd, &st);
  s.size_ = size_t(st.st_size);
  if (s.size_ < size_t(kShardHeaderBytes)) {
    ::close(fd);
    fail(path, "shard is " + std::to_string(s.size_) + " bytes, shorter than its 1024-byte header",
         "the file is truncated: run flexcp prepare-data again");
  }
  void* p = ::mmap(nullptr, s.size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail(path, std::string("cannot map shard: ") + std::strerror(errno));
  s.data_ = static_cast<const unsigned char*>(p);
  int32_t header[3];
  std::memcpy(header, s.data_, sizeof header);
  s.magic_ = header[0];
  if (header[0] == kShardMagicLlama3) {
    if (header[1] != kShardVersionLlama3)
      fail(path, "shard version " + std::to_string(header[1]) + ", expected " + std::to_string(kShardVersionLlama3) +
                     " for magic 20240801", "re-create the shard with flexcp prepare-data");
    s.token_bytes_ = 4;
  } else if (header[0] == kShardMagicGpt2) {
    if (header[1] != kShardVersionGpt2)
      fail(path, "shard version " + std::to_string(header[1]) + ", expected 1 for magic 20240520 (llm.c GPT-2)",
           "re-create the shard");
    s.token_bytes_ = 2;
  } else {
    fail(path, "not a token shard (magic " + std::to_string(header[0]) + ", expected 20240801 or 20240520)",
         "point data.path at a folder made by flexcp prepare-data");
  }
  s.num_tokens_ = header[2];
  size_t expect = size_t(kShardHeaderBytes) + size_t(std::max<int64_t>(s.num_tokens_, 0)) * s.token_bytes_;
  if (s.num_tokens_ < 0 || expect != s.size_)
    fail(path, "shard size " + std::to_string(s.size_) + " bytes disagrees with its header (" +
                   std::to_string(s.num_tokens_) + " tokens of " + std::to_string(s.token_bytes_) + " bytes + 1024 = " +
                   std::to_string(expect) + ")",
         "the file is truncated or corrupt: run flexcp prepare-data again");
  return s;
}

ShardFile::~ShardFile() {
  if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
}

ShardFile::ShardFile(ShardFile&& o) noexcept { *this = std::move(o); }

ShardFile& ShardFile::operator=(ShardFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
    path_ = std::move(o.path_);
    data_ = o.data_;
    size_ = o.size_;
    magic_ = o.magic_;
    num_tokens_ = o.num_tokens_;
    token_bytes_ = o.token_bytes_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

uint32_t ShardFile::token(int64_t i) const {
  const unsigned char* p = data_ + kShardHeaderBytes + size_t(i) * token_bytes_;
  if (token_bytes_ == 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

void ShardFile::copy(int64_t start, int64_t count, int32_t* out) const {
  const unsigned char* p = data_ + kShardHeaderBytes + size_t(start) * token_bytes_;
  if (token_bytes_ == 4) {
    std::memcpy(out, p, size_t(count) * 4);
  } else {
    for (int64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
  }
}

int64_t Manifest::split_tokens(const std::string& split) const {
  int64_t n = 0;
  for (const auto& s : shards)
    if (s.split == split) n += s.tokens;
  return n;
}

int64_t Manifest::split_documents(const std::string& split) const {
  int64_t n = 0;
  for (const auto& s : shards)
    if (s.split == split) n += s.documents;
  return n;
}

int64_t Manifest::split_shards(const std::string& split) const {
  return std::count_if(shards.begin(), shards.end(), [&](const ManifestShard& s) { return s.split == split; });
}

nlohmann::ordered_json manifest_to_json(const Manifest& m) {
  nlohmann::ordered_json j;
  j["format"] = "flexcp-token-shards";
  j["format_version"] = m.format_version;
  j["created_by"] = m.created_by;
  j["tokenizer"] = {{"name", m.tokenizer_name},
                    {"sha256", m.tokenizer_sha256},
                    {"vocab_size", m.vocab_size},
                    {"bos_id", m.bos_id},
                    {"eos_id", m.eos_id}};
  j["shard_format"] = {{"magic", m.shard_magic},
                       {"version", m.shard_version},
                       {"header_bytes", kShardHeaderBytes},
                       {"token_bytes", m.shard_magic == kShardMagicGpt2 ? 2 : 4}};
  nlohmann::ordered_json splits = nlohmann::ordered_json::object();
  for (const char* split : {"train", "val"})
    splits[split] = {{"shards", m.split_shards(split)},
                     {"tokens", m.split_tokens(split)},
                     {"documents", m.split_documents(split)}};
  j["splits"] = splits;
  j["shards"] = nlohmann::ordered_json::array();
  for (const auto& s : m.shards)
    j["shards"].push_back({{"file", s.file},
                           {"split", s.split},
                           {"tokens", s.tokens},
                           {"documents", s.documents},
                           {"max_token_id", s.max_token_id},
                           {"sha256", s.sha256}});
  j["prepare"] = m.prepare.is_null() ? nlohmann::ordered_json::object() : nlohmann::ordered_json::parse(m.prepare.dump());
  return j;
}

namespace {

template <typename T>
T field(const nlohmann::json& j, const char* key, const std::string& where, const std::string& path) {
  std::string name = path.empty() ? key : path + "." + key;
  if (!j.is_object() || !j.contains(key))
    fail(where, "missing field `" + name + "`", "the manifest is incomplete or not from flexcp: run flexcp prepare-data again");
  const auto& v = j.at(key);
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    // nlohmann converts a float or an out-of-range integer with a plain cast (undefined behaviour):
    // accept only integers that fit T.
    bool fits = false;
    if (v.is_number_unsigned()) {
      fits = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    } else if (v.is_number_integer()) {
      const int64_t x = v.get<int64_t>();
      fits = std::is_signed_v<T> ? x >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
                                       x <= static_cast<int64_t>(std::numeric_limits<T>::max())
                                 : x >= 0 && static_cast<uint64_t>(x) <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    }
    if (!fits)
      fail(where, "field `" + name + "` has the wrong type (want an integer in range, got " + v.dump().substr(0, 40) + ")",
           "run flexcp prepare-data again");
    return v.get<T>();
  }
  try {
    return v.get<T>();
  } catch (const nlohmann::json::exception&) {
    fail(where, "field `" + name + "` has the wrong type (" + j.at(key).dump().substr(0, 40) + ")",
         "run flexcp prepare-data again");
  }
}

}  // namespace

namespace {
Manifest manifest_from_json_unchecked(const nlohmann::json& j, const std::string& where) {
  Manifest m;
  if (!j.is_object() || j.value("format", std::string()) != "flexcp-token-shards")
    fail(where, "not a flexcp data set manifest (no \"format\": \"flexcp-token-shards\")",
         "point data.path at a folder made by flexcp prepare-data");
  m.format_version = field<int>(j, "format_version", where, "");
  if (m.format_version != Manifest::kFormatVersion)
    fail(where, "manifest format_version " + std::to_string(m.format_version) + ", this flexcp reads " +
                    std::to_string(Manifest::kFormatVersion),
         "re-create the data set with this flexcp's prepare-data");
  m.created_by = j.value("created_by", std::string());
  const auto& tok = j.contains("tokenizer") ? j["tokenizer"] : nlohmann::json();
  m.tokenizer_name = field<std::string>(tok, "name", where, "tokenizer");
  m.tokenizer_sha256 = field<std::string>(tok, "sha256", where, "tokenizer");
  m.vocab_size = field<int64_t>(tok, "vocab_size", where, "tokenizer");
  m.bos_id = field<int64_t>(tok, "bos_id", where, "tokenizer");
  // Optional, but checked like the others when present: nlohmann's value<int64_t> casts a number too
  // large for int64 (parsed as a double) with undefined behaviour (found by fuzz_manifest).
  m.eos_id = tok.is_object() && tok.contains("eos_id") ? field<int64_t>(tok, "eos_id", where, "tokenizer") : -1;
  const auto& sf = j.contains("shard_format") ? j["shard_format"] : nlohmann::json();
  m.shard_magic = field<int32_t>(sf, "magic", where, "shard_format");
  m.shard_version = field<int32_t>(sf, "version", where, "shard_format");
  if (!j.contains("shards") || !j["shards"].is_array())
    fail(where, "missing field `shards` (an array)", "run flexcp prepare-data again");
  for (size_t i = 0; i < j["shards"].size(); ++i) {
    const auto& s = j["shards"][i];
    std::string path = "shards[" + std::to_string(i) + "]";
    ManifestShard ms;
    ms.file = field<std::string>(s, "file", where, path);
    ms.split = field<std::string>(s, "split", where, path);
    ms.tokens = field<int64_t>(s, "tokens", where, path);
    ms.documents = field<int64_t>(s, "documents", where, path);
    ms.max_token_id = field<int64_t>(s, "max_token_id", where, path);
    ms.sha256 = field<std::string>(s, "sha256", where, path);
    if (ms.split != "train" && ms.split != "val")
      fail(where, path + ".split is '" + ms.split + "'", "use \"train\" or \"val\"");
    if (ms.file.empty() || ms.file.find('/') != std::string::npos)
      fail(where, path + ".file '" + ms.file + "' is not a file name inside the data set folder");
    m.shards.push_back(std::move(ms));
  }
  m.prepare = j.contains("prepare") ? j["prepare"] : nlohmann::json::object();
  return m;
}
}  // namespace

Manifest manifest_from_json(const nlohmann::json& j, const std::string& where) {
  try {
    return manifest_from_json_unchecked(j, where);
  } catch (const nlohmann::json::exception& e) {
    // A field of the wrong JSON type (j.value() and get<>() throw type_error; found by fuzzing).
    fail(where, std::string("malformed manifest: ") + e.what(), "run flexcp prepare-data again");
  }
}

Manifest manifest_read(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail(dir, fs::exists(dir, ec) ? "not a folder" : "data set folder not found",
         "make one with: flexcp prepare-data INPUTS... --out " + dir);
  std::string path = join(dir, "manifest.json");
  std::ifstream in(path);
  if (!in)
    fail(path, "not found: the data set is incomplete (an interrupted prepare-data writes no manifest)",
         "run flexcp prepare-data ... --out " + dir + " again");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("not valid JSON (") + e.what() + ")", "run flexcp prepare-data again");
  }
  return manifest_from_json(j, path);
}

void manifest_write(const std::string& dir, const Manifest& m) {
  write_file_atomic(join(dir, "manifest.json"), manifest_to_json(m).dump(2) + "\n");
}

void dataset_verify(const std::string& dir, const Manifest& m, bool checksums) {
  for (const auto& s : m.shards) {
    std::string path = join(dir, s.file);
    ShardFile f = ShardFile::open(path);
    if (f.magic() != m.shard_magic)
      fail(path, "shard magic " + std::to_string(f.magic()) + " differs from the manifest's " + std::to_string(m.shard_magic),
           "run flexcp prepare-data again");
    if (f.num_tokens() != s.tokens)
      fail(path, "shard has " + std::to_string(f.num_tokens()) + " tokens, the manifest says " + std::to_string(s.tokens),
           "run flexcp prepare-data again");
    if (checksums) {
      std::string got = sha256_file(path);
      if (got != s.sha256)
        fail(path, "SHA-256 " + got.substr(0, 16) + "... differs from the manifest's " + s.sha256.substr(0, 16) + "...",
             "the shard changed after it was written: run flexcp prepare-data again");
    }
  }
}

}  // namespace flexcp
