#include "core/data_loader.h"

#include <algorithm>
#include <filesystem>

#include "core/errors.h"

namespace flexcp {
namespace {

// SplitMix64's finalizer: a good 64-bit mix for hashing tuples of integers.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) { return mix64(mix64(mix64(a) ^ b) ^ c); }

}  // namespace

int64_t DataLoader::permute(int64_t index, int64_t n, uint64_t key) {
  if (n <= 1) return 0;
  // Balanced Feistel network on 2k bits (2^(2k) >= n), cycle-walking until the value is < n.
  // 2^(2k) < 4n, so fewer than 4 walks are expected.
  int bits = 1;
  while ((int64_t(1) << (2 * bits)) < n) ++bits;
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  uint64_t x = uint64_t(index);
  do {
    uint64_t left = x >> bits, right = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      uint64_t f = hash3(key, round, right) & mask;
      uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << bits) | right;
  } while (x >= uint64_t(n));
  return int64_t(x);
}

DataLoader::DataLoader(const DataConfig& cfg, int64_t seq_len, int64_t vocab_size, int64_t seed,
                       const std::string& split, int64_t global_batch)
    : synthetic_(cfg.synthetic),
      seq_len_(seq_len),
      vocab_size_(vocab_size),
      global_batch_(global_batch),
      seed_(uint64_t(seed)),
      split_(split),
      dir_(cfg.path) {
  if (seq_len <= 0) fail("train.seq_len", "must be positive, got " + std::to_string(seq_len));
  if (vocab_size <= 0) fail("model.vocab_size", "must be positive, got " + std::to_string(vocab_size));
  if (split != "train" && split != "val") fail("data split", "'" + split + "' is not \"train\" or \"val\"");
  if (synthetic_) return;
  if (cfg.path.empty())
    fail("data.path", "is empty", "set data.path to a folder made by `flexcp prepare-data`, or data.synthetic: true");
  manifest_ = manifest_read(cfg.path);
  std::string where = (std::filesystem::path(cfg.path) / "manifest.json").string();
  bos_id_ = manifest_.bos_id;
  if (manifest_.vocab_size > vocab_size)
    fail(where, "data set tokenizer has " + std::to_string(manifest_.vocab_size) + " ids, the model's vocab_size is " +
                    std::to_string(vocab_size),
         "use a model with vocab_size >= " + std::to_string(manifest_.vocab_size) + " or re-prepare the data");
  window_prefix_.push_back(0);
  for (const auto& s : manifest_.shards) {
    if (s.split != split) continue;
    if (s.max_token_id >= vocab_size)
      fail(where, s.file + " holds token id " + std::to_string(s.max_token_id) + ", outside the model's vocab_size " +
                      std::to_string(vocab_size),
           "use a model with a larger vocabulary or re-prepare the data with its tokenizer");
    std::string path = (std::filesystem::path(cfg.path) / s.file).string();
    ShardFile f = ShardFile::open(path);
    if (f.magic() != manifest_.shard_magic)
      fail(path, "shard magic " + std::to_string(f.magic()) + " differs from the manifest's " +
                     std::to_string(manifest_.shard_magic), "run flexcp prepare-data again");
    if (f.num_tokens() != s.tokens)
      fail(path, "shard has " + std::to_string(f.num_tokens()) + " tokens, the manifest says " + std::to_string(s.tokens),
           "the data set changed after it was made: run flexcp prepare-data again");
    int64_t windows = f.num_tokens() > seq_len ? (f.num_tokens() - 1) / seq_len : 0;
    num_tokens_ += f.num_tokens();
    num_windows_ += windows;
    window_prefix_.push_back(num_windows_);
    shards_.push_back(std::move(f));
  }
  if (shards_.empty())
    fail(where, "has no " + split + " shards",
         split == "val" ? "re-prepare with a larger --val-fraction, or set train.val_every: 0"
                        : "re-prepare the data set: it holds no training data");
  if (num_windows_ == 0)
    fail(where, "the " + split + " split has no shard of at least seq_len + 1 = " + std::to_string(seq_len + 1) +
                    " tokens", "lower train.seq_len or add data (or use a larger --shard-tokens)");
}

int64_t DataLoader::window_index(int64_t step, int64_t sample) const {
  if (global_batch_ > 0) {
    int64_t i = step * global_batch_ + sample;
    int64_t epoch = i / num_windows_;
    return permute(i % num_windows_, num_windows_, hash3(seed_, 0x65706f6368ull, uint64_t(epoch)));
  }
  return int64_t(hash3(seed_, uint64_t(step), uint64_t(sample)) % uint64_t(num_windows_));
}

int64_t DataLoader::epoch_of(int64_t step) const {
  if (synthetic_ || global_batch_ <= 0 || num_windows_ == 0) return 0;
  return step * global_batch_ / num_windows_;
}

TokenWindow DataLoader::window(int64_t step, int64_t sample) const {
  TokenWindow w;
  w.tokens.resize(size_t(seq_len_ + 1));
  w.doc_starts.push_back(0);
  if (synthetic_) {
    uint64_t key = hash3(seed_ ^ 0x73796e7468ull, uint64_t(step), uint64_t(sample));
    for (int64_t p = 0; p <= seq_len_; ++p) w.tokens[p] = int32_t(mix64(key ^ mix64(uint64_t(p))) % uint64_t(vocab_size_));
    return w;
  }
  int64_t g = window_index(step, sample);
  size_t shard = size_t(std::upper_bound(window_prefix_.begin(), window_prefix_.end(), g) - window_prefix_.begin() - 1);
  int64_t start = (g - window_prefix_[shard]) * seq_len_;
  const ShardFile& f = shards_[shard];
  f.copy(start, seq_len_ + 1, w.tokens.data());
  for (int64_t p = 0; p <= seq_len_; ++p) {
    int32_t t = w.tokens[p];
    if (t < 0 || t >= vocab_size_)
      fail(f.path(), "token " + std::to_string(uint32_t(t)) + " at position " + std::to_string(start + p) +
                         " is outside the model's vocab_size " + std::to_string(vocab_size_),
           "the shard is corrupt or from another tokenizer: re-prepare the data");
    if (t == bos_id_ && p > 0 && p < seq_len_) w.doc_starts.push_back(p);
  }
  return w;
}

int64_t DataLoader::num_tokens() const { return num_tokens_; }
int64_t DataLoader::num_windows() const { return num_windows_; }

}  // namespace flexcp
