// Context-parallel attention: an AttentionKernel that wraps a local kernel (reference, ffa) and
// runs one attention over tokens spread across the ranks of a cp group (docs/context-parallel.md).
//
// The model calls it with its LOCAL q, k, v (this rank's tokens, in the dispatch order) and the
// GLOBAL spec of the micro-batch; the plan comes from the context's planner (cached by spec), so
// the model needs no change. Forward: local stage on own keys while the first remote stage's K/V
// is in flight, then one stage per group of source ranks, each merged into (out, lse) (fp32 math,
// one rounding at the end). Backward: the same stages recomputed with the merged lse; dq stays
// local, dK/dV of remote keys are sent back to their owners (in k's dtype) and summed there in fp32.
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

// The last stage of a rank's plan with work for it (-1: none).
int64_t cp_last_stage_with_work(const CpRankPlan& rp);

// How the CP kernel sums one rank's per-stage partial results (also used by `flexcp bench cp-attn`
// to time the same compute without communication). The first part is kept as it is; a later part
// is merged in with fp32 math; between merges the running sum is fp32, so the result is rounded to
// q's dtype once. With one remote stage (cp = 2) that is a single fused merge (kernel->merge_into).
struct StageForwardSum {
  AttentionKernel* kernel = nullptr;  // its merge_into runs the merges
  int64_t last = -1;                  // cp_last_stage_with_work
  AttnForward acc;
  void add(int64_t stage, AttnForward part);
  AttnForward result(const at::Tensor& q) const;  // out 0, lse -inf when no stage had work
};
struct StageDqSum {
  int64_t last = -1;
  at::Tensor dq;
  void add(int64_t stage, const at::Tensor& part);
  at::Tensor result(const at::Tensor& q) const;  // zeros when no stage had work
};

// Merge of two partial attentions of the same queries over disjoint keys (attention-spec.md):
// out1/lse1 are updated in place; out1 is fp32 (T, H, D), lse (T, H) fp32; -inf rows are empty parts.
void attn_merge_into(at::Tensor& out1, at::Tensor& lse1, const at::Tensor& out2, const at::Tensor& lse2);

// One line per call kind: bytes per layer call sent and received by this rank.
std::string cp_stats_report(const CpContext& ctx);

}  // namespace flexcp
