// The gradient all-reduce of multi-rank training, overlapped with the backward of the step's last
// micro-batch, as PyTorch DDP does it: FlatAdamW's flat gradient buffer is cut into buckets of whole
// parameters, and each bucket is summed over the ranks (all_reduce_sum_async, on NCCL a side stream)
// as soon as its gradients are final, while the backward goes on with the layers below. Without it the
// whole buffer (5 GB of fp32 for Llama-3.2-1B) is all-reduced after the backward. On by default on
// NCCL (FLEXCP_GRAD_OVERLAP=0 turns it off): a step +9% faster at cp = 4, +2% at cp = 2, within 1% either
// way at dp = 2 and 4 (docs/performance.md); off on the CPU back-ends unless FLEXCP_GRAD_OVERLAP=1.
//
// "Final": the post hook of the parameter's AccumulateGrad node fired during the armed backward.
// Autograd runs that node once per backward, after every use of the parameter has added its part
// (also the dW GEMMs that add into .grad themselves, core/fused_ops.h: they hand autograd no
// gradient, but the node still runs after them), so the hook marks the moment nothing more arrives.
//
// Every rank must issue the same collectives in the same order, but autograd may finish parameters in
// another order on another rank (or under another schedule): buckets are therefore launched in one
// fixed order, the order in which a backward normally finishes them, and a bucket whose gradients are
// final waits until every bucket before it has been launched. The order: the decayed region of the
// flat buffer (matrices and embeddings, in model order) from its end to its start, then the small
// non-decayed region (norm weights) likewise. The backward runs the model in reverse (lm_head, last
// layer, ..., first layer, embedding), so each bucket of the decayed region is usually complete just
// when its turn comes; the norm weights are spread over all layers, so their region goes last (it is
// tiny). A tied embedding gets its last gradient at the very end, and it is at the start of the buffer,
// so it goes last among the decayed buckets.
//
// The all-reduce of the buckets runs on a communicator of its own (a duplicate of the world), so
// that it never interleaves with the collectives that the backward itself issues on the main one
// (context parallelism's K/V and dK/dV transfers).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace torch {
namespace autograd {
struct Node;
}  // namespace autograd
}  // namespace torch

namespace flexcp {

class Communicator;
class CommWork;
class FlatAdamW;
struct FlatParam;

// A contiguous range [offset, offset + numel) of FlatAdamW's flat buffers that holds whole parameters
// (params: indices into FlatAdamW::params(), in launch order within the bucket).
struct GradBucket {
  int64_t offset = 0;
  int64_t numel = 0;
  std::vector<size_t> params;
};

// The buckets in launch order (see above). A bucket takes parameters until the next one would take it
// past bucket_bytes of fp32 gradient; a parameter larger than that is a bucket alone. `params` must
// be FlatAdamW's: contiguous in offset order, decayed ones first.
std::vector<GradBucket> grad_buckets_plan(const std::vector<FlatParam>& params, int64_t bucket_bytes);

// Bucket size from FLEXCP_GRAD_BUCKET_MB (MiB, fractions allowed; default 64).
int64_t grad_bucket_bytes_from_env();

class GradReducer {
 public:
  // Registers a post hook on every parameter's AccumulateGrad node (kept alive here: a node that no
  // graph holds would otherwise be dropped with its hook, and the next forward would make a new one).
  // comm: the communicator the buckets are summed over (the trainer's duplicate of the world).
  GradReducer(FlatAdamW& opt, std::shared_ptr<Communicator> comm, int64_t bucket_bytes);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Before the backward of the step's last micro-batch. Outside an armed backward the hooks do nothing
  // (earlier micro-batches accumulate as usual: FlatAdamW::accumulate_grads()).
  void arm();
  // What the hook of parameter `param_index` (into FlatAdamW::params()) calls: its gradient is final.
  // Launches every bucket that is complete and next in the order.
  void param_ready(size_t param_index);
  // After that backward, in place of accumulate_grads() and the all-reduce of the whole buffer:
  // launches the buckets still waiting (their parameters got no gradient in this backward, so their
  // range is final as it is), in order, and waits for all (on GPU the current stream waits, the host
  // does not). FlatAdamW is then as after accumulate_grads() and the whole-buffer all-reduce.
  void finish();

  const std::vector<GradBucket>& buckets() const { return buckets_; }
  int64_t bucket_bytes() const { return bucket_bytes_; }
  // How many buckets the last armed backward launched before finish() (the overlapped ones).
  size_t launched_in_backward() const { return launched_in_backward_; }

 private:
  void bucket_launch(size_t bucket);

  FlatAdamW& opt_;
  std::shared_ptr<Communicator> comm_;
  int64_t bucket_bytes_;
  std::vector<GradBucket> buckets_;
  std::vector<size_t> bucket_of_param_;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;  // per parameter; null: no gradient
  std::vector<uintptr_t> hook_keys_;
  // Hooks run on autograd's threads (on GPU its device thread), the rest on the caller's.
  std::mutex mutex_;
  bool armed_ = false;
  std::vector<char> param_final_;
  std::vector<size_t> bucket_pending_;  // parameters of each bucket not final yet
  size_t next_bucket_ = 0;              // the first bucket not launched
  std::vector<std::unique_ptr<CommWork>> works_;
  size_t launched_in_backward_ = 0;
};

// The trainer's reducer: none with one rank; with more, one on NCCL unless FLEXCP_GRAD_OVERLAP=0, and on
// the other back-ends only with FLEXCP_GRAD_OVERLAP=1. Collective over `world` (all ranks call it): the
// settings must agree on every rank (else every rank stops with one line), and the reducer's
// communicator is split from `world`. device: where `world` takes tensors.
std::unique_ptr<GradReducer> grad_reducer_for_run(FlatAdamW& opt, const std::shared_ptr<Communicator>& world,
                                                  at::Device device);

}  // namespace flexcp
