// `flexcp inspect` for token data: one shard (*.bin) or a data set folder (manifest.json + shards).
// Reading goes through core/token_shards.h, the same code the trainer's data loader uses, so what
// inspect accepts is what training accepts.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <vector>

#include "core/errors.h"
#include "core/inspect.h"
#include "core/token_shards.h"

namespace flexcp {
namespace {

constexpr int64_t kLlama3Bos = 128000;   // <|begin_of_text|>
constexpr int64_t kGpt2Eot = 50256;      // <|endoftext|>, which llm.c's GPT-2 shards put before each document

std::string with_commas(int64_t n) {
  std::string s = std::to_string(n < 0 ? -n : n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return n < 0 ? "-" + s : s;
}

}  // namespace

ShardSummary inspect_shard(const std::string& path, int64_t bos_id) {
  const ShardFile f = ShardFile::open(path);
  ShardSummary s;
  s.path = path;
  s.magic = f.magic();
  s.version = f.magic() == kShardMagicLlama3 ? kShardVersionLlama3 : kShardVersionGpt2;  // open() checked it
  s.token_bytes = f.token_bytes();
  s.tokens = f.num_tokens();
  s.bos_id = bos_id >= 0 ? bos_id : (f.magic() == kShardMagicLlama3 ? kLlama3Bos : kGpt2Eot);
  // One pass in chunks: document boundaries are the BOS positions.
  constexpr int64_t kChunk = 1 << 20;
  std::vector<int32_t> buf(static_cast<size_t>(std::min<int64_t>(kChunk, std::max<int64_t>(s.tokens, 1))));
  int64_t doc_start = 0;
  int64_t sum_len = 0;
  auto close_doc = [&](int64_t end) {
    const int64_t len = end - doc_start;
    if (len <= 0) return;
    ++s.documents;
    sum_len += len;
    s.min_doc_tokens = s.documents == 1 ? len : std::min(s.min_doc_tokens, len);
    s.max_doc_tokens = std::max(s.max_doc_tokens, len);
  };
  for (int64_t start = 0; start < s.tokens; start += kChunk) {
    const int64_t n = std::min(kChunk, s.tokens - start);
    f.copy(start, n, buf.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = static_cast<uint32_t>(buf[static_cast<size_t>(i)]);
      s.max_token_id = std::max(s.max_token_id, id);
      if (id == s.bos_id) {
        close_doc(start + i);  // the text before this BOS (a partial document at the shard's start)
        doc_start = start + i;
      }
    }
  }
  close_doc(s.tokens);
  s.mean_doc_tokens = s.documents ? static_cast<double>(sum_len) / static_cast<double>(s.documents) : 0.0;
  return s;
}

DatasetSummary inspect_dataset(const std::string& path) {
  const Manifest m = manifest_read(path);
  DatasetSummary d;
  d.path = path;
  d.manifest = manifest_to_json(m);
  d.tokenizer = m.tokenizer_name;
  d.vocab_size = m.vocab_size;
  for (const auto& sh : m.shards) {
    auto& split = d.splits[sh.split];
    ++split.shards;
    split.tokens += sh.tokens;
    split.documents += sh.documents;
  }
  try {
    dataset_verify(path, m, /*checksums=*/false);
  } catch (const UserError& e) {
    d.problems.push_back(e.what());
  }
  return d;
}

std::string inspect_shard_text(const ShardSummary& s) {
  std::ostringstream out;
  char mean[32];
  std::snprintf(mean, sizeof(mean), "%.1f", s.mean_doc_tokens);
  out << "token shard: " << s.path << "\n"
      << "format: magic " << s.magic << " (" << (s.magic == kShardMagicLlama3 ? "Llama 3" : "GPT-2") << "), version "
      << s.version << ", " << s.token_bytes * 8 << "-bit tokens\n"
      << "tokens: " << with_commas(s.tokens) << ", largest id " << s.max_token_id << "\n"
      << "documents (starting with id " << s.bos_id << "): " << with_commas(s.documents);
  if (s.documents) out << "; tokens per document min " << s.min_doc_tokens << ", mean " << mean << ", max " << s.max_doc_tokens;
  out << "\n";
  return out.str();
}

nlohmann::json inspect_shard_json(const ShardSummary& s) {
  return {{"path", s.path},
          {"magic", s.magic},
          {"version", s.version},
          {"token_bytes", s.token_bytes},
          {"tokens", s.tokens},
          {"max_token_id", s.max_token_id},
          {"bos_id", s.bos_id},
          {"documents", s.documents},
          {"min_doc_tokens", s.min_doc_tokens},
          {"mean_doc_tokens", s.mean_doc_tokens},
          {"max_doc_tokens", s.max_doc_tokens}};
}

std::string inspect_dataset_text(const DatasetSummary& d) {
  std::ostringstream out;
  out << "data set: " << d.path << "\n"
      << "tokenizer: " << (d.tokenizer.empty() ? "?" : d.tokenizer) << ", vocabulary " << d.vocab_size << "\n";
  for (const auto& [name, s] : d.splits) {
    out << name << ": " << s.shards << " shard(s), " << with_commas(s.tokens) << " tokens, " << with_commas(s.documents)
        << " documents\n";
  }
  if (d.problems.empty()) out << "shards: present, headers and sizes match the manifest\n";
  for (const auto& p : d.problems) out << "problem: " << p << "\n";
  return out.str();
}

nlohmann::json inspect_dataset_json(const DatasetSummary& d) {
  nlohmann::json splits = nlohmann::json::object();
  for (const auto& [name, s] : d.splits) splits[name] = {{"shards", s.shards}, {"tokens", s.tokens}, {"documents", s.documents}};
  return {{"path", d.path}, {"tokenizer", d.tokenizer}, {"vocab_size", d.vocab_size}, {"splits", splits},
          {"problems", d.problems}, {"manifest", d.manifest}};
}

}  // namespace flexcp
