// Training windows from a prepared data set (docs/data.md).
//
// Each split's shards are memory-mapped. A window is seq_len + 1 consecutive tokens of one shard,
// at offsets k * seq_len (k = 0, 1, ...): consecutive windows share one token, the last label of
// one being the first input of the next, so every token is a label exactly once per epoch.
//
// Which window a (step, sample) gets is a pure function of (seed, step, sample): with the global
// batch size G known, i = step * G + sample numbers the draws, epoch = i / W and the window is
// P_epoch(i mod W), where W is the number of windows and P_epoch a seeded pseudo-random permutation
// of [0, W) (a Feistel network with cycle walking, re-keyed every epoch): each epoch visits every
// window once, in a fresh order. Without G (global_batch = 0) windows are drawn independently by a
// seeded hash of (step, sample), with replacement. Either way resume is exact and every rank layout
// (dp, cp) sees the same global batch, with nothing but the step to save.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/token_shards.h"

namespace flexcp {

struct TokenWindow {
  std::vector<int32_t> tokens;      // seq_len + 1 tokens (inputs are [0, seq_len), labels [1, seq_len+1))
  std::vector<int64_t> doc_starts;  // offsets in [0, seq_len) where a document segment starts; always has 0
};

class DataLoader {
 public:
  // cfg.path is a folder with manifest.json; cfg.synthetic gives deterministic random tokens instead
  // (vocab_size needed). split: "train" or "val". global_batch > 0 turns on epochs without
  // replacement (see above). Throws UserError for a missing or incomplete data set, bad shards
  // (magic, version, size, token count), tokens outside [0, vocab_size), or a split too small for
  // one window.
  DataLoader(const DataConfig& cfg, int64_t seq_len, int64_t vocab_size, int64_t seed, const std::string& split,
             int64_t global_batch = 0);
  // Window `sample` (0 <= sample < global_batch) of optimizer step `step`: a pure function of
  // (seed, step, sample) so resume is exact and every rank layout (dp, cp) sees the same global batch.
  TokenWindow window(int64_t step, int64_t sample) const;
  int64_t num_tokens() const;   // tokens in this split (0 for synthetic data)
  int64_t num_windows() const;  // distinct windows in this split (0 for synthetic data)
  int64_t epoch_of(int64_t step) const;  // epochs completed before `step` (0 without global_batch)
  const Manifest& manifest() const { return manifest_; }

  // The bijection of [0, n) that epoch-style sampling uses (exposed for tests).
  static int64_t permute(int64_t index, int64_t n, uint64_t key);

 private:
  int64_t window_index(int64_t step, int64_t sample) const;

  bool synthetic_ = false;
  int64_t seq_len_ = 0, vocab_size_ = 0, global_batch_ = 0;
  uint64_t seed_ = 0;
  std::string split_, dir_;
  Manifest manifest_;
  std::vector<ShardFile> shards_;
  std::vector<int64_t> window_prefix_;  // window_prefix_[i] = windows in shards before i
  int64_t num_tokens_ = 0, num_windows_ = 0;
  int64_t bos_id_ = -1;
};

}  // namespace flexcp
