#include "core/grad_reducer.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "core/comm.h"
#include "core/env_switch.h"
#include "core/errors.h"
#include "core/optimizer.h"

namespace flexcp {

namespace {

constexpr int64_t kDefaultBucketBytes = int64_t(64) << 20;

// Runs after the parameter's AccumulateGrad node. The signature is the same in LibTorch 1.13 and 2.x
// (2.x adds compiled_args, with a default that only compiled autograd calls).
class ParamFinalHook final : public torch::autograd::FunctionPostHook {
 public:
  ParamFinalHook(GradReducer* reducer, size_t param_index) : reducer_(reducer), param_index_(param_index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    reducer_->param_ready(param_index_);
    return outputs;
  }

 private:
  GradReducer* reducer_;
  size_t param_index_;
};

}  // namespace

std::vector<GradBucket> grad_buckets_plan(const std::vector<FlatParam>& params, int64_t bucket_bytes) {
  TORCH_CHECK(bucket_bytes > 0, "grad_buckets_plan: bucket size must be positive");
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK(params[i].offset == params[i - 1].offset + params[i - 1].param.numel(),
                "grad_buckets_plan: parameters must be contiguous in offset order");
    TORCH_CHECK(params[i].decay <= params[i - 1].decay, "grad_buckets_plan: decayed parameters must come first");
  }
  std::vector<GradBucket> out;
  // One region at a time, from its last parameter to its first: a bucket never mixes the regions.
  for (const bool decay : {true, false}) {
    GradBucket bucket;
    int64_t bytes = 0;
    for (size_t i = params.size(); i-- > 0;) {
      if (params[i].decay != decay) continue;
      const int64_t numel = params[i].param.numel();
      const int64_t b = numel * static_cast<int64_t>(sizeof(float));
      if (!bucket.params.empty() && bytes + b > bucket_bytes) {
        out.push_back(std::move(bucket));
        bucket = GradBucket{};
        bytes = 0;
      }
      bucket.params.push_back(i);
      bucket.offset = params[i].offset;  // walking down: the lowest offset so far
      bucket.numel += numel;
      bytes += b;
    }
    if (!bucket.params.empty()) out.push_back(std::move(bucket));
  }
  return out;
}

int64_t grad_bucket_bytes_from_env() {
  const double mb = env_positive_number("FLEXCP_GRAD_BUCKET_MB", double(kDefaultBucketBytes) / double(1 << 20), 1e6);
  return std::max<int64_t>(1, std::llround(mb * double(1 << 20)));
}

GradReducer::GradReducer(FlatAdamW& opt, std::shared_ptr<Communicator> comm, int64_t bucket_bytes)
    : opt_(opt), comm_(std::move(comm)), bucket_bytes_(bucket_bytes),
      buckets_(grad_buckets_plan(opt.params(), bucket_bytes)) {
  const auto& params = opt_.params();
  bucket_of_param_.assign(params.size(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (size_t p : buckets_[b].params) bucket_of_param_[p] = b;
  param_final_.assign(params.size(), 0);
  bucket_pending_.assign(buckets_.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    // A parameter that needs no gradient has no accumulator: finish() launches its bucket.
    std::shared_ptr<torch::autograd::Node> acc =
        params[i].param.requires_grad() ? torch::autograd::impl::grad_accumulator(params[i].param) : nullptr;
    uintptr_t key = 0;
    if (acc) key = acc->add_post_hook(std::make_unique<ParamFinalHook>(this, i));
    accumulators_.push_back(std::move(acc));
    hook_keys_.push_back(key);
  }
}

GradReducer::~GradReducer() {
  for (size_t i = 0; i < accumulators_.size(); ++i)
    if (accumulators_[i]) accumulators_[i]->del_post_hook(hook_keys_[i]);
}

void GradReducer::arm() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!works_.empty()) throw std::logic_error("GradReducer: armed again before finish()");
  std::fill(param_final_.begin(), param_final_.end(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) bucket_pending_[b] = buckets_[b].params.size();
  next_bucket_ = 0;
  armed_ = true;
}

void GradReducer::param_ready(size_t param_index) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;
  TORCH_CHECK(param_index < param_final_.size(), "GradReducer: no parameter ", param_index);
  // A second gradient after the bucket may have gone out would be lost: autograd runs each
  // AccumulateGrad node once per backward, so this means a reentrant backward the design excludes.
  if (param_final_[param_index])
    throw std::logic_error("GradReducer: parameter '" + opt_.params()[param_index].name +
                           "' got its gradient twice in one backward");
  param_final_[param_index] = 1;
  --bucket_pending_[bucket_of_param_[param_index]];
  while (next_bucket_ < buckets_.size() && bucket_pending_[next_bucket_] == 0) bucket_launch(next_bucket_++);
}

void GradReducer::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) throw std::logic_error("GradReducer: finish() without arm()");
  armed_ = false;
  launched_in_backward_ = next_bucket_;
  while (next_bucket_ < buckets_.size()) bucket_launch(next_bucket_++);
  for (auto& w : works_) w->wait();
  works_.clear();
  opt_.accumulate_grads_ranges_done();
}

void GradReducer::bucket_launch(size_t bucket) {
  const GradBucket& b = buckets_[bucket];
  at::Tensor range = opt_.accumulate_grads_range(b.offset, b.numel);
  works_.push_back(comm_->all_reduce_sum_async(range));
}

std::unique_ptr<GradReducer> grad_reducer_for_run(FlatAdamW& opt, const std::shared_ptr<Communicator>& world,
                                                  at::Device device) {
  if (world->size() == 1) return nullptr;
  // On by default on NCCL (GPUs), where it was measured (docs/performance.md: +2% and +9% a step at
  // cp = 2 and 4, within 1% either way at dp = 2 and 4); off on the CPU back-ends unless asked for.
  const bool on = env_switch("FLEXCP_GRAD_OVERLAP", world->backend() == "nccl" && world->can_split());
  const int64_t bucket_bytes = grad_bucket_bytes_from_env();
  // Ranks that disagree would issue different collectives (or buckets of other sizes) and hang:
  // rank 0's settings go to all, and any rank that differs stops every rank.
  const std::string mine = on ? std::to_string(bucket_bytes) : "off";
  std::vector<uint8_t> root(mine.begin(), mine.end());
  world->broadcast_bytes(root, 0);
  const std::string rank0(root.begin(), root.end());
  at::Tensor differs = at::full({1}, rank0 != mine ? 1.0f : 0.0f, at::TensorOptions().dtype(at::kFloat).device(device));
  world->all_reduce_sum(differs);
  if (differs.item<float>() > 0) {
    auto describe = [](const std::string& v) { return v == "off" ? std::string("overlap off") : v + "-byte buckets"; };
    fail("FLEXCP_GRAD_OVERLAP / FLEXCP_GRAD_BUCKET_MB",
         "not every rank has rank 0's settings (rank 0: " + describe(rank0) + ", rank " +
             std::to_string(world->rank()) + ": " + describe(mine) + ")",
         "set them alike on every rank, or leave them unset");
  }
  if (!on) return nullptr;
  if (!world->can_split())
    fail("FLEXCP_GRAD_OVERLAP", "the overlapped all-reduce needs a communicator of its own, and this " +
         world->backend() + " build cannot split one", "unset FLEXCP_GRAD_OVERLAP, or build with NCCL 2.18 or newer");
  return std::make_unique<GradReducer>(opt, world->split(0, world->rank()), bucket_bytes);
}

}  // namespace flexcp
