// AdamW over flat buffers. All parameters live in one contiguous fp32 master buffer (decayed ones
// first), with matching flat buffers for the gradient and both moments, so a step is a handful of
// element-wise kernels over the whole model (a multi-tensor step without a multi-tensor kernel), and
// the gradient all-reduce is one call over one buffer.
//
// fp32 models: parameters become views of the master buffer and their .grad views of the gradient
// buffer, so autograd accumulates straight into it. Lower-precision models (bf16 on GPU): parameters
// are views of a bf16 copy that is refreshed from the master after each step; micro-batch gradients
// are added into the fp32 gradient buffer by accumulate_grads().
//
// The math is PyTorch's AdamW (decoupled weight decay, bias correction), so runs match
// torch.optim.AdamW step for step.
//
// On CUDA (fp32 or bf16 models) the passes are fused kernels (core/optimizer_fused.h): the step reads
// gradient, master and moments once and writes master, moments and the bf16 copy once, with the clip
// factor and the skip decision read from device memory, so a step needs no host sync. The torch-op
// path stays for the CPU and as the reference (FLEXCP_OPTIM_FUSED=0 selects it on CUDA too).
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace flexcp {

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

struct FlatParam {
  std::string name;
  at::Tensor param;   // the model's parameter (rebound to a view)
  int64_t offset = 0; // into the flat buffers
  bool decay = true;
};

class FlatAdamW {
 public:
  // Weight decay applies to parameters with two or more dimensions (matrices and embeddings), not to
  // norm weights. Parameters shared under two names (tied embeddings) are counted once.
  FlatAdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_params, const AdamWHyper& hyper);

  void zero_grad();
  // After each micro-batch's backward: moves low-precision parameter gradients into the fp32
  // buffer (nothing to do for fp32 models, whose gradients are views of it).
  void accumulate_grads();
  // The same by parts, for the gradient all-reduce that overlaps the last micro-batch's backward
  // (core/grad_reducer.h): accumulate_grads_range settles the parameters of [offset, offset + numel)
  // (whole parameters, each range once) as accumulate_grads() would, and returns that range of the
  // fp32 gradient buffer, final for this micro-batch. Once every range is settled,
  // accumulate_grads_ranges_done() leaves the optimizer as accumulate_grads() would. Not with
  // set_single_micro_batch on (the fp32 buffer is what gets all-reduced).
  at::Tensor accumulate_grads_range(int64_t offset, int64_t numel);
  void accumulate_grads_ranges_done();
  // For steps of exactly one micro-batch and no gradient all-reduce (one rank): on the fused
  // low-precision path the fp32 gradient buffer is then skipped. accumulate_grads() moves nothing,
  // clip_grad_norm() and step() read the model's bf16 gradients (the same update bit for bit: the
  // fp32 buffer would hold them converted exactly), and step() zeroes them for the next backward.
  // grad_flat() still gives the fp32 gradient: reading it makes the copy, which the step then uses.
  // A no-op elsewhere (CPU, fp32 models, FLEXCP_OPTIM_FUSED=0). While on, a second
  // accumulate_grads() in one step throws (autograd would have summed the micro-batches in bf16).
  // The trainer turns it on for one micro-batch on one rank unless FLEXCP_OPTIM_DIRECT_GRADS=0.
  void set_single_micro_batch(bool on);
  bool direct_grads() const { return direct_; }
  // Global L2 norm of the gradient and the factor that brings it to at most max_norm (0: no
  // clipping); the next step() applies the factor (the gradient buffer itself is left as it is).
  // Returns the norm before clipping, on the device (no host sync).
  at::Tensor clip_grad_norm(double max_norm);
  // The update. `skip` (optional bool scalar on the optimizer's device): when true, weights and
  // moments are left untouched, decided on the device so the caller need not read it first. The
  // host cannot know the outcome without a sync, so the step is counted as taken; a caller that
  // learns afterwards that it was skipped calls uncount_step().
  void step(double lr, const at::Tensor& skip = {});
  void uncount_step() { --steps_; }

  at::Tensor& grad_flat();
  at::Tensor& master_flat() { return master_; }
  int64_t steps_taken() const { return steps_; }
  int64_t numel() const { return master_.numel(); }
  const std::vector<FlatParam>& params() const { return params_; }

  // Checkpoint state: per-parameter views named "<kind>.<param name>" for kind in
  // master, exp_avg, exp_avg_sq. load_state copies them back (shapes checked by the caller's reader).
  std::map<std::string, at::Tensor> state_tensors() const;
  void load_state(const std::map<std::string, at::Tensor>& tensors, int64_t steps_taken);

 private:
  void refresh_model_params();
  void grads_rebind(int64_t begin, int64_t end);
  void model_grads_move(at::Tensor grad, at::Tensor model_grad);
  void step_torch_ops(double lr, const at::Tensor& skip);

  AdamWHyper hyper_;
  std::vector<FlatParam> params_;
  int64_t decay_numel_ = 0;
  int64_t steps_ = 0;
  bool low_precision_ = false;
  bool fused_ = false;       // CUDA kernels instead of torch ops
  // Fused low-precision path: zero_grad() leaves grad_ to the first accumulate_grads, which
  // overwrites it (one pass fewer); grad_flat() zeroes it if read before that.
  bool grad_stale_ = false;
  // set_single_micro_batch on the fused low-precision path:
  bool direct_ = false;
  bool grad_in_model_ = false;   // this step's gradient is in model_grad_flat_ only (no fp32 copy yet)
  bool direct_stepped_ = false;  // the last step read model_grad_flat_ (and zeroed it unless skipped)
  at::Tensor direct_skip_;       // that step's device skip flag: where set, model_grad_flat_ still holds its gradient
  at::Tensor clip_scale_;    // fp32 scalar from clip_grad_norm, used and dropped by the next step()
  at::Tensor master_, grad_, exp_avg_, exp_avg_sq_;  // fp32, flat
  at::Tensor model_flat_, model_grad_flat_;          // model dtype, flat (low precision only)
};

}  // namespace flexcp
