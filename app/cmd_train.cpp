// `flexcp train CONFIG [--set k=v]... [--dry-run] [--resume | --resume-from DIR]` and
// `flexcp config-reference [--out FILE]`.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>

#include "app/command_registry.h"
#include "core/atomic_file.h"
#include "core/config.h"
#include "core/device_info.h"
#include "core/metrics_log.h"
#include "core/errors.h"
#include "core/resource_errors.h"
#include "core/trainer.h"

namespace flexcp {
namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> sets;
  bool dry_run = false;
  bool resume = false;
  bool quiet = false;
  std::string resume_from;
  int64_t world_size = 0;  // 0 = from the launcher's environment
  int64_t profile_step = 0;
};

// The launchers we support say how many processes they started: torchrun-style WORLD_SIZE, OpenMPI's
// mpirun, or Slurm's srun. One process when none is set.
int64_t world_size_from_env(std::string& from) {
  for (const char* name : {"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (*end != '\0' || n < 1) fail(std::string("environment ") + name, std::string("'") + v + "' is not a process count", "unset it or fix the launcher");
    from = name;
    return n;
  }
  from = "default";
  return 1;
}

void run_train(const TrainArgs& a) {
  std::vector<std::string> sets = a.sets;
  if (a.quiet) sets.push_back("logging.quiet=true");
  const RunConfig cfg = config_load(a.config, sets);
  std::string ws_from = "--world-size";
  const int64_t world = a.world_size > 0 ? a.world_size : world_size_from_env(ws_from);
  const DerivedNumbers d = config_derive(cfg, world);
  const std::string yaml = config_to_yaml(cfg);
  if (a.dry_run) {
    // The whole output is valid YAML (derived numbers are comments), so it can be saved and reused.
    std::cout << "# flexcp resolved config from " << cfg.source << "\n" << yaml << "\n"
              << "# derived (world size from " << ws_from << "):\n"
              << "#   parameters:      " << d.params << " (" << human_count(static_cast<double>(d.params)) << ")\n"
              << "#   world_size:      " << d.world_size << "\n"
              << "#   cp:              " << cfg.parallel.cp << "\n"
              << "#   dp:              " << d.dp << "\n"
              << "#   tokens_per_step: " << d.tokens_per_step << "\n"
              << "#   grad_accum:      " << d.grad_accum << "  (micro-batches per rank per step)\n";
    return;
  }
  TrainOptions opts;
  opts.resume = a.resume;
  opts.resume_from = a.resume_from;
  opts.config_text = yaml;
  opts.profile_step = a.profile_step;
  check_runtime_resources(cfg, world, device_cuda_available());
  try {
    command_exit_code() = train_run(cfg, opts);
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    if (!is_out_of_memory(e)) throw;
    fail(cfg.source, out_of_memory_message(cfg, world, e.what()));
  }
}

void setup_train(CLI::App& sub) {
  auto a = std::make_shared<TrainArgs>();
  sub.add_option("config", a->config, "YAML run config, e.g. configs/tiny.yaml")->required();
  sub.add_option("--set", a->sets, "override one key, e.g. --set train.lr=1e-4 (repeatable; value read as YAML)")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false);
  sub.add_flag("--quiet", a->quiet, "no per-step console output (metrics.jsonl is still written)");
  sub.add_flag("--dry-run", a->dry_run, "print the resolved config and derived numbers, then exit without training");
  auto* resume = sub.add_flag("--resume", a->resume, "continue from the newest complete checkpoint in checkpoint.dir");
  sub.add_option("--resume-from", a->resume_from, "continue from this checkpoint folder")->excludes(resume);
  sub.add_option("--profile-step", a->profile_step,
                 "time step N by phase (forward, loss, backward, optimizer, ...) and bracket it with "
                 "cudaProfilerStart/Stop for `ncu --profile-from-start off`")
      ->check(CLI::PositiveNumber);
  sub.add_option("--world-size", a->world_size,
                 "with --dry-run: assume this many processes (default: WORLD_SIZE, OMPI_COMM_WORLD_SIZE, SLURM_NTASKS, else 1)")
      ->check(CLI::PositiveNumber);
  sub.callback([a] {
    if (a->world_size > 0 && !a->dry_run) fail("--world-size", "only means something with --dry-run", "the launcher sets the world size");
    run_train(*a);
  });
}

void setup_config_reference(CLI::App& sub) {
  auto out = std::make_shared<std::string>();
  sub.add_option("--out", *out, "write to this file (atomically) instead of standard output");
  sub.callback([out] {
    const std::string md = config_reference_markdown();
    if (out->empty()) std::cout << md;
    else write_file_atomic(*out, md);
  });
}

CommandRegistration train_reg("train", "Train a model from a YAML config", setup_train);
CommandRegistration reference_reg("config-reference", "Print the Markdown reference of every config key",
                                  setup_config_reference);

}  // namespace
}  // namespace flexcp
