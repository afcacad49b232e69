#include "core/cp_run.h"

#include <ATen/ATen.h>

#include "core/comm_nccl.h"
#include "core/errors.h"

namespace flexcp {

int64_t cp_chunk_size_for(const RunConfig& cfg) {
  const int64_t cp = cfg.parallel.cp;
  return cfg.parallel.cp_chunk_size > 0 ? cfg.parallel.cp_chunk_size : cp_chunk_size_default(cfg.train.seq_len, cp);
}

void cp_config_check(const RunConfig& cfg, int64_t world_size, bool cuda) {
  const std::string& src = cfg.source.empty() ? std::string("config") : cfg.source;
  const int64_t cp = cfg.parallel.cp, seq = cfg.train.seq_len;
  if (cp < 1) fail(src, "parallel.cp (" + std::to_string(cp) + ") must be at least 1", "use 1, 2, 4 or 8");
  if (world_size % cp != 0)
    fail(src, "parallel.cp (" + std::to_string(cp) + ") does not divide the world size (" + std::to_string(world_size) +
                  " processes)",
         "launch a multiple of " + std::to_string(cp) + " processes or change parallel.cp");
  if (seq % cp != 0)
    fail(src, "train.seq_len (" + std::to_string(seq) + ") is not a multiple of parallel.cp (" + std::to_string(cp) + ")",
         "each rank holds seq_len / cp tokens: pick a seq_len divisible by cp");
  const int64_t chunk = cfg.parallel.cp_chunk_size;
  if (chunk > 0 && seq % (cp * chunk) != 0)
    fail(src, "train.seq_len (" + std::to_string(seq) + ") does not divide into cp x parallel.cp_chunk_size (" +
                  std::to_string(cp) + " x " + std::to_string(chunk) + ") chunks",
         "pick a cp_chunk_size that divides seq_len / cp = " + std::to_string(seq / cp) + ", or 0 to choose one");
  const std::string& comm = cfg.parallel.communicator;
  if (cuda && (comm == "auto" || comm == "nccl") && !nccl_available())
    fail(src, "train.device is cuda but this flexcp was built without NCCL (parallel.communicator: " + comm + ")",
         "rebuild where nccl.h and libnccl are found, or train on the CPU");
  if (!cuda && comm == "nccl")
    fail(src, "parallel.communicator: nccl needs CUDA, but the run is on the CPU", "use communicator: auto (mpi or tcp)");
  if (world_size > 1 && comm == "none")
    fail(src, "parallel.communicator is none but " + std::to_string(world_size) + " processes were launched",
         "use communicator: auto");
}

std::shared_ptr<CpContext> cp_context_for_run(const RunConfig& cfg, std::shared_ptr<Communicator> world) {
  CpDispatchOptions o;
  o.cp = cfg.parallel.cp;
  o.chunk_size = cp_chunk_size_for(cfg);
  return cp_context_create(std::move(world), cfg.parallel.cp, o);
}

CpBatch cp_dispatch_batch(CpContext& ctx, const AttentionSpec& global_spec, const at::Tensor& tokens,
                          const at::Tensor& labels, const at::Tensor& positions) {
  CpBatch b;
  b.plan = ctx.planner->plan_for(global_spec);
  b.rank = &b.plan->ranks[ctx.cp_rank];
  const int rank = static_cast<int>(ctx.cp_rank);
  auto flat = [&](const at::Tensor& t) {
    return t.defined() ? cp_dispatch_rows(*b.plan, rank, t.size(0) == global_spec.num_q ? t : t.reshape({-1}))
                       : at::Tensor();
  };
  b.tokens = flat(tokens);
  b.labels = flat(labels);
  b.positions = flat(positions);
  return b;
}

}  // namespace flexcp
