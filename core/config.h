// The run config: a YAML file that maps one-to-one onto these structs (section = struct,
// key = field). `--set a.b=c` overrides any field. Every field is registered once in config.cpp's
// field table, which drives parsing, overrides, did-you-mean, printing and the generated reference.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/llama_arch.h"

namespace flexcp {

struct ModelConfig {
  std::string preset = "tiny";  // "tiny", "llama3.2-1b"; ignored when `from` is set
  std::string from;             // HF folder: config.json and optionally *.safetensors (weights)
  LlamaArch arch;               // resolved architecture (preset or config.json, then YAML keys)
  double init_std = 0.02;       // normal init of fresh weights (HF initializer_range)
};

struct DataConfig {
  std::string path;            // folder with manifest.json made by `flexcp prepare-data`
  bool synthetic = false;      // random tokens instead of shards (benchmarks, smoke tests)
  bool document_mask = false;  // one CAUSAL slice per document inside each window
};

struct TrainConfig {
  int64_t steps = 200;
  int64_t global_batch = 8;  // sequences per optimizer step, over all data-parallel ranks
  int64_t micro_batch = 1;   // sequences per forward/backward on one rank
  int64_t seq_len = 256;
  double lr = 3e-4;
  int64_t warmup = 20;            // linear warm-up steps
  std::string schedule = "cosine";  // cosine | linear | constant (after warm-up)
  double min_lr = 3e-5;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;  // max global grad norm; 0 disables
  int64_t seed = 1234;
  std::string dtype = "auto";   // fp32 | bf16 | auto (bf16 on GPU with fp32 master weights, fp32 on CPU)
  std::string device = "auto";  // cpu | cuda | auto
  bool activation_checkpointing = false;
  int64_t val_every = 0;    // steps between validation passes; 0 disables
  int64_t val_batches = 4;  // micro-batches per validation pass
  // Non-finite loss or gradient norm (core/numerics_guard.h): "stop" writes a dump and ends the run;
  // "skip" drops the step's update (counted; more than max_skipped_steps in a run stops it).
  std::string on_nonfinite = "stop";
  int64_t max_skipped_steps = 10;
  double spike_factor = 0;  // log a loss spike when loss > spike_factor * running mean; 0 disables
};

struct ParallelConfig {
  int64_t cp = 1;                    // context-parallel size; dp = world_size / cp
  std::string attention = "torch";   // reference | torch | ffa
  int64_t cp_chunk_size = 0;         // dispatch chunk in tokens; 0 = ceil(seq_len / (8 * cp))
  std::string communicator = "auto"; // auto | mpi | nccl | none
  bool deterministic = false;        // fixed reduction order in the attention backward
  // Seconds a collective may wait for the other ranks before this rank names the late or dead rank
  // and exits with code 3 (core/comm_watchdog.h); 0 waits forever.
  double timeout_s = 600;
};

struct CheckpointConfig {
  std::string dir;      // default: <logging.dir>/checkpoints
  int64_t every = 0;    // steps between checkpoints; 0 = none before the end (see at_end)
  int64_t keep_last = 3;
  bool at_end = true;   // also save after the last step (off for benchmarks and throw-away runs)
};

struct LoggingConfig {
  std::string dir = "runs/default";  // run folder: metrics.jsonl, config.yaml, checkpoints/
  int64_t every = 1;                 // console line every N steps (metrics.jsonl gets every step)
  bool quiet = false;
  bool csv = false;                  // also write metrics.csv (same fields as metrics.jsonl)
};

struct RunConfig {
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  std::string source;  // file the config came from (for messages)
};

// Numbers derived from a config and the world size, shown by --dry-run and used by the trainer.
struct DerivedNumbers {
  int64_t params = 0;
  int64_t world_size = 1;
  int64_t dp = 1;
  int64_t tokens_per_step = 0;  // global_batch * seq_len
  int64_t grad_accum = 1;       // global_batch / (dp * micro_batch)
};

// Loads a YAML file, applies `--set key.path=value` overrides, resolves the model architecture
// (preset or `from` folder's config.json, then explicit keys) and validates. Throws UserError with a
// one-line message naming file, key and fix (unknown key with a did-you-mean, wrong type,
// impossible combination).
RunConfig config_load(const std::string& path, const std::vector<std::string>& overrides = {});
RunConfig config_from_string(const std::string& yaml_text, const std::string& source_name,
                             const std::vector<std::string>& overrides = {});
// Checks that need the world size (cp divides world, global batch divides into dp * micro_batch).
DerivedNumbers config_derive(const RunConfig& cfg, int64_t world_size);
// The resolved config as YAML (every field), as --dry-run prints it and runs save it.
std::string config_to_yaml(const RunConfig& cfg);
// Markdown reference of every field (key, type, default, meaning), generated from the field table.
std::string config_reference_markdown();

}  // namespace flexcp
