// flexcp export CHECKPOINT --out DIR: a folder transformers loads as LlamaForCausalLM
// (config.json, safetensors, and the tokenizer files when known).
#include <filesystem>
#include <iostream>

#include "app/command_registry.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/hf_weights.h"
#include "core/llama_model.h"
#include "core/tokenizer.h"

namespace flexcp {
namespace {
namespace fs = std::filesystem;

struct ExportArgs {
  std::string checkpoint, out, config, dtype = "bf16", tokenizer;
};

// A step folder as given, or the newest checkpoint of a run folder / checkpoints folder.
fs::path resolve_checkpoint(const std::string& path) {
  if (fs::exists(fs::path(path) / "state.json")) return path;
  for (const fs::path& dir : {fs::path(path) / "checkpoints", fs::path(path)}) {
    const std::string latest = checkpoint_find_latest(dir.string());
    if (!latest.empty()) return latest;
  }
  fail(path, "no checkpoint here", "give a run folder, its checkpoints/ folder, or a step_* folder");
}

void run_export(const ExportArgs& a) {
  const fs::path ckpt = resolve_checkpoint(a.checkpoint);
  // The run folder's config.yaml (written by flexcp train) gives the architecture.
  const fs::path config = a.config.empty() ? ckpt.parent_path().parent_path() / "config.yaml" : fs::path(a.config);
  if (!fs::exists(config)) fail(config.string(), "run config not found", "pass --config with the run's YAML");
  const RunConfig cfg = config_load(config.string());
  if (a.dtype != "bf16" && a.dtype != "fp32") fail("--dtype", "expected bf16 or fp32, got '" + a.dtype + "'");

  LlamaModel model(cfg.model.arch, cfg.model.init_std);
  hf_load_weights(*model, (ckpt / "model.safetensors").string());
  HfSaveOptions opts;
  opts.dtype = a.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  hf_save_model(*model, a.out, opts);

  const std::string tok = a.tokenizer.empty() ? tokenizer_default_path() : a.tokenizer;
  if (fs::exists(tok)) {
    fs::copy_file(tok, fs::path(a.out) / "tokenizer.json", fs::copy_options::overwrite_existing);
  } else {
    std::cerr << "note: no tokenizer.json at " << tok << "; the export has weights and config only (--tokenizer to add it)\n";
  }
  std::cout << "exported " << ckpt.string() << " (step " << checkpoint_load_step(ckpt.string()) << ") to " << a.out << "\n";
}

void setup_export(CLI::App& sub) {
  auto a = std::make_shared<ExportArgs>();
  sub.add_option("checkpoint", a->checkpoint, "Run folder, checkpoints folder or step_* folder")->required();
  sub.add_option("--out", a->out, "Output folder (created)")->required();
  sub.add_option("--config", a->config, "Run YAML (default: config.yaml of the run folder)");
  sub.add_option("--dtype", a->dtype, "Weight dtype of the export: bf16 (default) or fp32");
  sub.add_option("--tokenizer", a->tokenizer, "tokenizer.json to include (default: the cached Llama 3 one)");
  sub.callback([a] { run_export(*a); });
}

CommandRegistration reg("export", "Export a checkpoint as an HF transformers Llama folder", setup_export);

}  // namespace
}  // namespace flexcp
