// `flexcp prepare-data INPUTS... --out DIR`: text to token shards + manifest.json (docs/data.md).
#include <cstdio>
#include <iostream>

#include "app/command_registry.h"
#include "core/prepare_data.h"

namespace flexcp {
namespace {

void setup_prepare_data(CLI::App& sub) {
  auto o = std::make_shared<PrepareDataOptions>();
  auto no_progress = std::make_shared<bool>(false);
  sub.add_option("inputs", o->inputs, ".txt, .jsonl or .json files, folders (searched recursively) or quoted globs")
      ->required();
  sub.add_option("--out,-o", o->out_dir, "Output folder for the shards and manifest.json")->required();
  sub.add_option("--tokenizer", o->tokenizer_path, "HF tokenizer.json (default: $FLEXCP_TOKENIZER or the cached Llama 3 one)");
  sub.add_option("--txt-documents", o->txt_documents, "A .txt document is the whole 'file' or each 'blank-line'-separated block")
      ->check(CLI::IsMember({"file", "blank-line"}))
      ->capture_default_str();
  sub.add_option("--text-field", o->text_field, "Field holding the text in .jsonl lines and .json objects")->capture_default_str();
  sub.add_option("--val-fraction", o->val_fraction, "Share of documents put in the validation split")->capture_default_str();
  sub.add_option("--shard-tokens", o->shard_tokens, "Tokens per shard")->capture_default_str();
  sub.add_option("--threads", o->threads, "Tokenizer threads (0 = all cores)")->capture_default_str();
  sub.add_flag("--no-progress", *no_progress, "No progress bar");
  sub.add_flag("--force", o->force, "Rebuild even when the data set is up to date");
  sub.callback([o, no_progress] {
    o->progress = !*no_progress;
    PrepareDataResult r = prepare_data(*o);
    if (r.up_to_date) {
      std::cout << "prepare-data: " << o->out_dir << " is up to date (same inputs, tokenizer and settings; --force rebuilds): "
                << r.train_tokens << " train + " << r.val_tokens << " val tokens\n";
      return;
    }
    std::printf("prepare-data: %lld files, %.1f MB -> %s in %.1f s\n", (long long)r.files, r.input_bytes / 1e6,
                o->out_dir.c_str(), r.seconds);
    std::printf("  train: %lld documents, %lld tokens, %lld shards\n", (long long)r.train_documents,
                (long long)r.train_tokens, (long long)r.train_shards);
    std::printf("  val:   %lld documents, %lld tokens, %lld shards\n", (long long)r.val_documents,
                (long long)r.val_tokens, (long long)r.val_shards);
    if (r.empty_documents) std::printf("  skipped %lld empty documents\n", (long long)r.empty_documents);
    if (r.utf8_replaced_documents)
      std::printf("  %lld documents had invalid UTF-8, replaced by U+FFFD\n", (long long)r.utf8_replaced_documents);
    if (r.val_documents == 0 && o->val_fraction > 0)
      std::printf("  note: the validation split is empty; raise --val-fraction for validation\n");
  });
}

CommandRegistration reg("prepare-data", "Tokenize text (.txt, .jsonl, .json) into token shards + manifest.json",
                        setup_prepare_data);

}  // namespace
}  // namespace flexcp
