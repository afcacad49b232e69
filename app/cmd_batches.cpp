// flexcp batches CONFIG --out windows.npy [--steps N] [--set k=v]...: the token windows `flexcp
// train CONFIG` would train on, in order, for reference runs in other trainers.
#include <iostream>

#include "app/command_registry.h"
#include "core/batch_export.h"
#include "core/config.h"

namespace flexcp {
namespace {

struct BatchesArgs {
  std::string config, out;
  std::vector<std::string> sets;
  int64_t steps = 0;
};

void setup_batches(CLI::App& sub) {
  auto a = std::make_shared<BatchesArgs>();
  sub.add_option("config", a->config, "YAML run config, e.g. configs/llama3.2-1b.yaml")->required();
  sub.add_option("--out", a->out, "the .npy file to write (int32, rows = steps x global_batch, cols = seq_len + 1)")
      ->required();
  sub.add_option("--steps", a->steps, "optimizer steps to export (default: train.steps)");
  sub.add_option("--set", a->sets, "override one key, as in flexcp train");
  sub.callback([a] {
    const RunConfig cfg = config_load(a->config, a->sets);
    const int64_t steps = a->steps > 0 ? a->steps : cfg.train.steps;
    const int64_t rows = batches_export(cfg, steps, a->out);
    std::cout << "wrote " << rows << " windows of " << cfg.train.seq_len + 1 << " tokens (" << steps << " steps x "
              << cfg.train.global_batch << ") to " << a->out << "\n";
  });
}

CommandRegistration reg("batches", "Write the token windows a run trains on, in order, as a .npy array", setup_batches);

}  // namespace
}  // namespace flexcp
