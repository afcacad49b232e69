// `flexcp prepare-data`: text in, token shards + manifest.json out (docs/data.md).
//
// Inputs are files, folders (searched recursively) or globs of
//   .txt    one document per file, or per blank-line-separated block (txt_documents)
//   .jsonl  one JSON object per line; the document is its `text_field` string
//   .json   an array of strings (or of objects with a `text_field` string)
// Each document becomes <|begin_of_text|> + its ids (special-token text inside documents stays
// text). A seeded hash of the document's text puts it in "val" with probability val_fraction,
// else "train" (duplicates land in the same split, and the choice does not depend on order or
// threads). The output is identical for any thread count.
//
// Safety: shards are written atomically under names unique to the run, and manifest.json is
// replaced atomically at the very end, after which the previous run's shards are removed. An
// interrupted run therefore leaves the previous data set (or none) intact; running again cleans
// up the leftovers. A run whose inputs (paths, sizes, times), tokenizer and settings match the
// manifest's fingerprint does nothing unless `force`.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace flexcp {

struct PrepareDataOptions {
  std::vector<std::string> inputs;
  std::string out_dir;
  std::string tokenizer_path;           // empty: tokenizer_default_path()
  std::string txt_documents = "file";   // "file" | "blank-line"
  std::string text_field = "text";      // .jsonl / .json objects
  double val_fraction = 0.01;           // in [0, 1)
  int64_t shard_tokens = 100'000'000;   // tokens per shard (the last of each split may hold fewer)
  int threads = 0;                      // tokenizer threads; 0 = all cores
  bool progress = true;                 // progress bar on stderr
  bool force = false;                   // rebuild even when up to date
};

struct PrepareDataResult {
  bool up_to_date = false;  // nothing was done
  int64_t files = 0;
  int64_t input_bytes = 0;
  int64_t train_documents = 0, val_documents = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  int64_t train_shards = 0, val_shards = 0;
  int64_t empty_documents = 0;        // skipped
  int64_t utf8_replaced_documents = 0;  // documents with invalid UTF-8 (replaced by U+FFFD)
  double seconds = 0;
};

// Throws UserError (one line, exit code 2) for missing inputs, unsupported file types, unreadable
// or malformed JSON (file and line), a bad tokenizer, or an output folder in use by another run.
PrepareDataResult prepare_data(const PrepareDataOptions& opts);

}  // namespace flexcp
