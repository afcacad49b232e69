// Context-parallel dispatch: pure planning, no communication (docs/context-parallel.md).
//
// Every rank builds the same CpPlan from the same global spec: the token axis is cut into chunks,
// chunks are assigned to ranks so that attention work (visible (q, k) cells, not tokens) is
// balanced, and each rank gets
//   - its tokens (ascending chunks, concatenated): the permutation local -> global;
//   - the remote key/value tokens its queries can see, per source rank (deduplicated ranges);
//   - its kv buffer: [own tokens | remote tokens of stage 1 | stage 2 | ...], remote tokens of a
//     stage ordered by source rank, then by global position;
//   - its local spec: q in local token coordinates, k in kv-buffer coordinates, split into stages
//     (stage 0 = own keys, then one stage per group of source ranks) for overlapped transfers;
//   - per stage, the all-to-all-v counts and the local rows it sends to each peer.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/attention_spec.h"

namespace flexcp {

struct CpDispatchOptions {
  int64_t cp = 1;
  int64_t chunk_size = 0;     // tokens per chunk; 0 = cp_chunk_size_default(num_tokens, cp)
  int64_t remote_stages = 0;  // groups of source ranks fetched one after the other; 0 = min(cp - 1, 2)
};

// A run of kv-buffer rows that holds the global tokens `global` of rank `src`, starting at row
// `buf` of the buffer and at row `src_local` of the source's local token order.
struct KvRun {
  int src = 0;
  Range global;
  int64_t src_local = 0;
  int64_t buf = 0;
};

struct CpStage {
  Range buf;                          // rows [begin, end) of the kv buffer this stage fills/uses
  AttentionSpec spec;                 // q: local rows; k: rows of this stage's buffer (0-based)
  std::vector<int64_t> send_counts;   // tokens sent to each rank in this stage's all-to-all-v
  std::vector<int64_t> recv_counts;   // tokens received from each rank (stage 0: all zero)
  std::vector<int64_t> send_index;    // local rows sent, grouped by destination rank ascending
};

struct CpRankPlan {
  int rank = 0;
  int64_t num_local = 0;                   // tokens this rank owns (the same on every rank)
  std::vector<int64_t> local_to_global;    // token permutation: local row -> global token
  std::vector<Range> owned;                // global ranges owned, ascending (merged chunks)
  std::vector<std::vector<Range>> recv_ranges;  // per source rank: global ranges fetched from it
  std::vector<KvRun> kv_runs;              // the kv buffer, run by run, in buffer order
  int64_t kv_len = 0;                      // rows of the kv buffer (own + remote)
  AttentionSpec local_spec;                // q local rows x k kv-buffer rows (all stages)
  std::vector<CpStage> stages;             // [0] = own keys, then remote stages
  int64_t area = 0;                        // visible (q, k) cells of this rank's queries
};

struct CpPlan {
  int64_t cp = 1;
  int64_t chunk_size = 0;
  int64_t num_tokens = 0;
  int64_t num_chunks = 0;
  std::vector<int> chunk_owner;        // per chunk
  std::vector<int64_t> chunk_area;     // per chunk: visible cells of its rows
  std::vector<CpRankPlan> ranks;       // every rank's plan (each rank needs the others' to send)
  int64_t spec_area = 0;

  // max rank area / mean rank area (1.0 = perfect; 1.0 as well for an empty spec).
  double imbalance() const;
};

// Default chunk: ceil(num_tokens / (8 cp)) (MagiAttention's choice), lowered until cp * chunk
// divides num_tokens. Throws UserError when num_tokens is not a multiple of cp.
int64_t cp_chunk_size_default(int64_t num_tokens, int64_t cp);

// Visible cells of each chunk's rows (the work the solver balances).
std::vector<int64_t> cp_chunk_areas(const AttentionSpec& spec, int64_t chunk_size);

// The balancing solver: each rank gets exactly work.size() / cp chunks; chunks, largest first, go to
// the least-loaded rank that still has room, then pairwise swaps lower the most-loaded rank while
// they can. Deterministic (integer arithmetic, fixed tie-breaks): every rank computes the same result.
std::vector<int> cp_assign_chunks(const std::vector<int64_t>& work, int64_t cp);

// The whole plan. The spec must be self-attention over one flattened token axis (num_q == num_k)
// and num_tokens must be a multiple of cp * chunk_size; otherwise UserError.
CpPlan cp_plan_build(const AttentionSpec& global, const CpDispatchOptions& opts);

// Rows of `global` (dim 0 = global tokens) that `rank` owns, in local order.
at::Tensor cp_dispatch_rows(const CpPlan& plan, int rank, const at::Tensor& global);
// Inverse: per-rank local tensors (dim 0 = local tokens) back into global token order.
at::Tensor cp_undispatch_rows(const CpPlan& plan, const std::vector<at::Tensor>& per_rank);

// Communication volume per rank per attention layer, in tokens of K+V (multiply by
// 2 * kv_heads * head_dim * bytes per element for bytes).
struct CpCommVolume {
  std::vector<int64_t> send_tokens;   // forward group-cast, per rank
  std::vector<int64_t> recv_tokens;
  int64_t ring_send_tokens = 0;       // ring / pass-KV: (cp - 1) * num_tokens / cp, every rank
  int64_t total_send() const;
  int64_t total_ring() const { return ring_send_tokens * static_cast<int64_t>(send_tokens.size()); }
};
CpCommVolume cp_comm_volume(const CpPlan& plan);

// A table, one line per rank: area, bytes sent / received per layer (forward; the backward casts
// K/V again and returns dK/dV in fp32), and what ring attention would send.
std::string cp_comm_report(const CpPlan& plan, int64_t kv_heads, int64_t head_dim, int64_t elem_bytes);

// Caches plans by spec (every batch of fixed-length windows has the same spec; document masks vary).
class CpPlanner {
 public:
  CpPlanner(CpDispatchOptions opts, size_t capacity = 8) : opts_(opts), capacity_(capacity) {}
  std::shared_ptr<const CpPlan> plan_for(const AttentionSpec& global);
  const CpDispatchOptions& options() const { return opts_; }

 private:
  struct Entry {
    std::string key;
    std::shared_ptr<const CpPlan> plan;
  };
  CpDispatchOptions opts_;
  size_t capacity_;
  std::vector<Entry> entries_;  // most recent last
};

}  // namespace flexcp
