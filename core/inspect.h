// `flexcp inspect PATH`: what is in a file or folder flexcp reads or writes. Each kind has a summary
// struct (tested directly), a JSON form, and a text form for people.
//
//   safetensors file, HF model folder (model.safetensors or an index with shards)  -> tensor table
//   checkpoint folder (state.json + model.safetensors), folder of checkpoints        -> step, tensors
//   run folder (metrics.jsonl), metrics file                                         -> steps, loss
//   token shard (*.bin), data set folder (manifest.json)                             -> tokens, documents
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace flexcp {

enum class InspectKind { safetensors, model_folder, checkpoint, checkpoints_folder, run_folder, metrics, shard, dataset };
const char* inspect_kind_name(InspectKind kind);
// Decides from names and contents what `path` is. Throws UserError when it is none of the above.
InspectKind inspect_detect(const std::string& path);

struct InspectOptions {
  bool brief = false;  // tensor tables: one row per layer pattern (model.layers.*.mlp...) instead of per tensor
  bool stats = false;  // tensor tables: read the data for min / max / mean / std / non-finite count
};

// ---- tensors
struct TensorStats {
  double min = 0, max = 0, mean = 0, std = 0;
  int64_t nonfinite = 0;
};
struct TensorInfo {
  std::string name;  // in --brief tables, the pattern with '*' for layer numbers
  std::string dtype;  // as in the file: F32, BF16, ...
  std::vector<int64_t> shape;
  int64_t numel = 0;
  uint64_t bytes = 0;
  int64_t count = 1;           // tensors this row stands for (> 1 only in --brief tables)
  bool has_stats = false;
  TensorStats stats;
};
struct SafetensorsSummary {
  std::string source;               // the file or folder opened
  std::vector<std::string> files;   // the .safetensors files behind it
  std::vector<TensorInfo> tensors;  // natural name order (layers.2 before layers.10)
  int64_t num_tensors = 0;
  int64_t num_params = 0;
  uint64_t num_bytes = 0;
  std::map<std::string, int64_t> params_by_dtype;
  std::map<std::string, std::string> metadata;  // __metadata__ of the first file
  int64_t nonfinite = 0;                         // with stats
};
SafetensorsSummary inspect_safetensors(const std::string& path, const InspectOptions& options);

// "model.layers.10.mlp.up_proj.weight" before "model.layers.2.x"? No: numbers compare as numbers.
bool natural_less(const std::string& a, const std::string& b);
// Collapses numbered components ("model.layers.3.x" -> "model.layers.*.x") and merges rows with
// the same pattern, dtype and shape; stats are combined (min of mins, ...; std from the pooled moments).
std::vector<TensorInfo> tensor_rows_grouped(const std::vector<TensorInfo>& rows);

// ---- metrics
struct MetricsSummary {
  std::string path;
  int64_t records = 0;
  int64_t first_step = 0, last_step = 0;
  int64_t missing_steps = 0;  // steps between first and last with no line
  double last_loss = 0;
  double min_loss = 0;
  int64_t min_loss_step = 0;
  int64_t nonfinite_losses = 0;
  int64_t first_nonfinite_step = 0;
  double last_lr = 0, last_grad_norm = 0, last_tokens = 0;
  double median_tokens_per_s = 0, median_step_ms = 0, median_mfu = 0, max_peak_mem_gib = 0;
  double last_val_loss = 0;
  int64_t last_val_step = 0;  // 0 when the run has no validation loss
  std::vector<std::string> notes;
};
MetricsSummary inspect_metrics(const std::string& path);
// The loss logged at `step` in `metrics_path`, if that file exists and has it.
bool metrics_loss_at(const std::string& metrics_path, int64_t step, double& loss);

// ---- checkpoints and runs
struct CheckpointSummary {
  std::string path;
  int64_t step = 0;
  nlohmann::json state;  // state.json as written
  SafetensorsSummary model;
  bool has_optimizer = false;
  int64_t optimizer_tensors = 0;
  uint64_t optimizer_bytes = 0;
  std::vector<std::string> model_tensors_without_moments;  // expected exp_avg.X and exp_avg_sq.X
  bool has_logged_loss = false;  // the run's metrics.jsonl (two folders up) has this step
  double logged_loss = 0;
};
CheckpointSummary inspect_checkpoint(const std::string& path, const InspectOptions& options);

struct CheckpointEntry {
  std::string path;
  int64_t step = 0;
};
// Complete checkpoints (step_* folders with state.json) in `dir`, ascending step.
std::vector<CheckpointEntry> inspect_list_checkpoints(const std::string& dir);

struct RunSummary {
  std::string path;
  MetricsSummary metrics;
  bool has_config = false;
  std::map<std::string, std::string> config;  // a few keys of config.yaml (preset, cp, seq_len, ...)
  std::vector<CheckpointEntry> checkpoints;
};
RunSummary inspect_run(const std::string& path);

// ---- token data
struct ShardSummary {
  std::string path;
  int32_t magic = 0;
  int32_t version = 0;
  int token_bytes = 0;
  int64_t tokens = 0;
  int64_t bos_id = -1;  // document start token used for the counts
  int64_t documents = 0;  // BOS tokens (a text before the first BOS counts as a partial document)
  int64_t min_doc_tokens = 0, max_doc_tokens = 0;
  double mean_doc_tokens = 0;
  int64_t max_token_id = -1;
};
// Reads the header and scans the tokens. bos_id < 0: 128000 for Llama 3 shards, 50256 for GPT-2.
ShardSummary inspect_shard(const std::string& path, int64_t bos_id = -1);

struct DatasetSummary {
  std::string path;
  nlohmann::json manifest;  // as written
  std::string tokenizer;
  int64_t vocab_size = 0;
  struct Split {
    int64_t shards = 0, tokens = 0, documents = 0;
  };
  std::map<std::string, Split> splits;  // "train", "val"
  std::vector<std::string> problems;    // a listed shard missing or disagreeing with its header
};
DatasetSummary inspect_dataset(const std::string& path);

// ---- the command: text for people, JSON for scripts.
std::string inspect_text(const std::string& path, const InspectOptions& options);
nlohmann::json inspect_json(const std::string& path, const InspectOptions& options);

}  // namespace flexcp
