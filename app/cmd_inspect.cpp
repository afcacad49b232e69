// `flexcp inspect PATH... [--brief] [--stats] [--json]`: a summary of safetensors files, HF model
// folders, checkpoints, run folders, metrics files, token shards and data sets.
#include <iostream>
#include <memory>

#include "app/command_registry.h"
#include "core/inspect.h"

namespace flexcp {
namespace {

struct InspectArgs {
  std::vector<std::string> paths;
  InspectOptions options;
  bool json = false;
};

void setup_inspect(CLI::App& sub) {
  auto a = std::make_shared<InspectArgs>();
  sub.footer(
      "PATH may be: a .safetensors file or HF model folder (tensor table), a checkpoint folder or its parent\n"
      "(step, state, tensors), a run folder (logging.dir) or metrics.jsonl (steps, loss, speed), a token shard\n"
      "(.bin) or a data set folder with manifest.json (tokens, documents).\n"
      "Example: flexcp inspect runs/tiny/checkpoints/step_00000200 --brief --stats\n");
  sub.add_option("paths", a->paths, "files or folders to summarize")->required();
  sub.add_flag("--brief", a->options.brief, "tensor tables: one row per layer pattern (model.layers.*.…) with a count");
  sub.add_flag("--stats", a->options.stats, "tensor tables: read the weights for min/max/mean/std and non-finite counts");
  sub.add_flag("--json", a->json, "print JSON instead of text (one object, or an array for several paths)");
  sub.callback([a] {
    if (a->json) {
      nlohmann::json all = nlohmann::json::array();
      for (const auto& p : a->paths) all.push_back(inspect_json(p, a->options));
      std::cout << (all.size() == 1 ? all[0] : all).dump(1) << "\n";
      return;
    }
    for (size_t i = 0; i < a->paths.size(); ++i) {
      if (i) std::cout << "\n";
      std::cout << inspect_text(a->paths[i], a->options);
    }
  });
}

CommandRegistration inspect_reg("inspect", "Summarize a safetensors file, checkpoint, run, metrics file, token shard or data set",
                                setup_inspect);

}  // namespace
}  // namespace flexcp
