// What the trainer needs from context parallelism, as plain functions:
//   cp_config_check    the parallel settings against the world, before any work starts
//   cp_context_for_run the cp groups and the planner of a run
//   cp_dispatch_batch  this rank's share of a micro-batch (tokens, labels, positions) and its plan
// The model then runs on the local tokens with the GLOBAL spec; the attention kernel is
// make_cp_attention_kernel(local kernel, ctx) wrapped by backend_from_kernel.
//
// Loss and gradients (docs/context-parallel.md): each rank sums the cross-entropy of its own
// tokens and divides by the GLOBAL token count of the step (known on every rank, since every rank
// reads the whole global batch); gradients are then summed over every rank (ctx.world), which gives
// the no-CP gradient for any cp with the same global batch.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>

#include "core/attention_spec.h"
#include "core/config.h"
#include "core/cp_attention.h"
#include "core/cp_dispatch.h"

namespace flexcp {

// The dispatch chunk of a run: parallel.cp_chunk_size, or cp_chunk_size_default(seq_len, cp).
int64_t cp_chunk_size_for(const RunConfig& cfg);

// Throws UserError with a one-line message naming the field and the fix: cp not dividing the world
// size, seq_len not divisible into cp chunks (cp * cp_chunk_size must divide seq_len), a GPU run in
// a build without NCCL, a communicator that cannot work with this launcher.
void cp_config_check(const RunConfig& cfg, int64_t world_size, bool cuda);

std::shared_ptr<CpContext> cp_context_for_run(const RunConfig& cfg, std::shared_ptr<Communicator> world);

struct CpBatch {
  at::Tensor tokens, labels, positions;  // (num_local,) this rank's tokens in dispatch order
  std::shared_ptr<const CpPlan> plan;
  const CpRankPlan* rank = nullptr;      // plan->ranks[cp_rank]: local spec, kv buffer, transfers
};

// `tokens`, `labels`, `positions` hold the whole micro-batch (dim 0 or all dims flattened = the
// spec's token axis); positions are each token's position inside its sample and travel with it.
CpBatch cp_dispatch_batch(CpContext& ctx, const AttentionSpec& global_spec, const at::Tensor& tokens,
                          const at::Tensor& labels, const at::Tensor& positions);

}  // namespace flexcp
