// Context-parallel attention: an AttentionKernel that wraps a local kernel (reference, ffa) and
// runs one attention over tokens spread across the ranks of a cp group (docs/context-parallel.md).
//
// The model calls it with its LOCAL q, k, v (this rank's tokens, in the dispatch order) and the
// GLOBAL spec of the micro-batch; the plan comes from the context's planner (cached by spec), so
// the model needs no change. Forward: local stage on own keys while the first remote stage's K/V
// is in flight, then one stage per group of source ranks, each merged into (out, lse) in fp32.
// Backward: the same stages recomputed with the merged lse; dq stays local, dK/dV of remote keys
// are sent back to their owners and summed there (fp32).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/attention_backend.h"
#include "core/comm.h"
#include "core/cp_dispatch.h"

namespace flexcp {

// Bytes moved by this rank's CP attention calls (all layers together).
struct CpCommStats {
  int64_t forward_calls = 0;
  int64_t backward_calls = 0;
  int64_t forward_sent = 0, forward_received = 0;    // K/V group-cast
  int64_t backward_sent = 0, backward_received = 0;  // K/V cast again + dK/dV group-reduce
};

// Everything a rank needs to take part in context parallelism. world = dp x cp; the ranks of one
// cp group are consecutive (rank = dp_rank * cp + cp_rank), so a group sits on one node when it can.
struct CpContext {
  std::shared_ptr<Communicator> world;  // every rank: gradient all-reduce, loss
  std::shared_ptr<Communicator> group;  // this rank's cp group: K/V traffic
  int64_t cp = 1, dp = 1, cp_rank = 0, dp_rank = 0;
  std::shared_ptr<CpPlanner> planner;
  CpCommStats stats;
};

// Splits `world` into cp groups (collective). UserError when cp does not divide the world size.
std::shared_ptr<CpContext> cp_context_create(std::shared_ptr<Communicator> world, int64_t cp,
                                             const CpDispatchOptions& dispatch);

std::shared_ptr<AttentionKernel> make_cp_attention_kernel(std::shared_ptr<AttentionKernel> local,
                                                          std::shared_ptr<CpContext> ctx);

// Merge of two partial attentions of the same queries over disjoint keys (attention-spec.md):
// out1/lse1 are updated in place; out1 is fp32 (T, H, D), lse (T, H) fp32; -inf rows are empty parts.
void attn_merge_into(at::Tensor& out1, at::Tensor& lse1, const at::Tensor& out2, const at::Tensor& lse2);

// One line per call kind: bytes per layer call sent and received by this rank.
std::string cp_stats_report(const CpContext& ctx);

}  // namespace flexcp
