#include "core/optimizer.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <unordered_set>

#include "core/env_switch.h"
#include "core/errors.h"
#include "core/optimizer_fused.h"

namespace flexcp {

namespace {
// Element-wise passes over a 1B-parameter model go chunk by chunk so temporaries stay small.
constexpr int64_t kStepChunk = int64_t(1) << 26;

// The fused kernels cover CUDA buffers of fp32 models and bf16 ones (the dtypes train.dtype allows).
bool fused_wanted(const at::Tensor& param) {
#ifdef FLEXCP_OPTIMIZER_FUSED
  if (!env_switch("FLEXCP_OPTIM_FUSED", true)) return false;
  return param.is_cuda() && (param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16);
#else
  (void)param;
  return false;
#endif
}

AdamWScalars adamw_scalars(const AdamWHyper& h, double lr, int64_t step) {
  AdamWScalars s;
  s.decay_factor = 1.0 - lr * h.weight_decay;
  s.beta1 = h.beta1, s.one_minus_beta1 = 1.0 - h.beta1;
  s.beta2 = h.beta2, s.one_minus_beta2 = 1.0 - h.beta2;
  s.bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(step)));
  s.eps = h.eps;
  s.step_size = -lr / (1.0 - std::pow(h.beta1, static_cast<double>(step)));
  return s;
}
}  // namespace

FlatAdamW::FlatAdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_params, const AdamWHyper& hyper)
    : hyper_(hyper) {
  std::unordered_set<const void*> seen;
  std::vector<FlatParam> decay, no_decay;
  for (const auto& [name, p] : named_params) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;  // tied weights: once
    (p.dim() >= 2 ? decay : no_decay).push_back({name, p, 0, p.dim() >= 2});
  }
  if (decay.empty() && no_decay.empty()) fail("optimizer", "the model has no parameters");
  params_ = std::move(decay);
  params_.insert(params_.end(), no_decay.begin(), no_decay.end());
  int64_t total = 0;
  for (auto& fp : params_) {
    fp.offset = total;
    total += fp.param.numel();
    if (fp.decay) decay_numel_ = total;
  }
  const auto& first = params_.front().param;
  const auto fp32 = first.options().dtype(at::kFloat);
  low_precision_ = first.scalar_type() != at::kFloat;
  fused_ = fused_wanted(first);
  master_ = at::empty({total}, fp32);
  grad_ = at::zeros({total}, fp32);
  exp_avg_ = at::zeros({total}, fp32);
  exp_avg_sq_ = at::zeros({total}, fp32);
  if (low_precision_) {
    model_flat_ = at::empty({total}, first.options());
    model_grad_flat_ = at::zeros({total}, first.options());
  }
  at::NoGradGuard no_grad;
  for (auto& fp : params_) {
    const int64_t n = fp.param.numel();
    master_.narrow(0, fp.offset, n).copy_(fp.param.reshape({-1}));
    at::Tensor& weights = low_precision_ ? model_flat_ : master_;
    at::Tensor& grads = low_precision_ ? model_grad_flat_ : grad_;
    if (low_precision_) weights.narrow(0, fp.offset, n).copy_(fp.param.reshape({-1}));
    fp.param.set_data(weights.narrow(0, fp.offset, n).view(fp.param.sizes()));
    fp.param.mutable_grad() = grads.narrow(0, fp.offset, n).view(fp.param.sizes());
  }
}

void FlatAdamW::zero_grad() {
  // Fused: the first accumulate_grads overwrites grad_, and the model-dtype gradients are zero
  // already (every accumulate_grads leaves them so, and so does every direct step that applied;
  // autograd only adds into them in between).
  if (fused_ && low_precision_) {
    grad_stale_ = true;
#ifdef FLEXCP_OPTIMIZER_FUSED
    if (grad_in_model_) model_grad_flat_.zero_();  // a direct gradient no step used
    else if (direct_skip_.defined()) fused_zero_if(model_grad_flat_, direct_skip_);  // one a skipped step left
#endif
    grad_in_model_ = direct_stepped_ = false;
    direct_skip_ = at::Tensor();
    return;
  }
  grad_.zero_();
  if (low_precision_) model_grad_flat_.zero_();
}

void FlatAdamW::set_single_micro_batch(bool on) {
  const bool direct = on && fused_ && low_precision_;
  if (direct_ && !direct) grad_flat();  // settles a pending direct gradient into grad_
  direct_ = direct;
}

at::Tensor& FlatAdamW::grad_flat() {
#ifdef FLEXCP_OPTIMIZER_FUSED
  if (grad_in_model_) {  // direct: the fp32 copy now; the step then reads it
    fused_grads_accumulate(grad_, model_grad_flat_, /*overwrite=*/true);
    grad_in_model_ = grad_stale_ = false;
    return grad_;
  }
  if (direct_stepped_) {  // what the direct step left: its gradient where it was skipped, else zeros
    grad_.copy_(model_grad_flat_);
    grad_stale_ = false;
    return grad_;
  }
#endif
  if (grad_stale_) {
    grad_.zero_();
    grad_stale_ = false;
  }
  return grad_;
}

// Autograd accumulates into the existing .grad views in place; should anything have replaced a
// gradient with a fresh tensor, copy it back and re-bind the view. Parameters starting in [begin, end).
void FlatAdamW::grads_rebind(int64_t begin, int64_t end) {
  at::Tensor& grads = low_precision_ ? model_grad_flat_ : grad_;
  for (auto& fp : params_) {
    if (fp.offset < begin || fp.offset >= end) continue;
    const auto& g = fp.param.grad();
    auto view = grads.narrow(0, fp.offset, fp.param.numel()).view(fp.param.sizes());
    if (!g.defined() || g.data_ptr() == view.data_ptr()) continue;
    view.copy_(g);
    fp.param.mutable_grad() = view;
  }
}

void FlatAdamW::accumulate_grads() {
  at::NoGradGuard no_grad;
  grads_rebind(0, grad_.numel());
  if (!low_precision_) return;
  if (grad_in_model_)
    throw std::logic_error("FlatAdamW: a second micro-batch in one step with set_single_micro_batch on");
  if (direct_ && grad_stale_) {  // the step's only micro-batch: its gradient stays where autograd put it
    grad_in_model_ = true;
    return;
  }
  model_grads_move(grad_, model_grad_flat_);
  grad_stale_ = false;
}

// grad (fp32) = model_grad (overwrite: the step's first accumulation on the fused path, grad_stale_)
// or += model_grad, then model_grad = 0: one fused pass on CUDA, torch ops elsewhere.
void FlatAdamW::model_grads_move(at::Tensor grad, at::Tensor model_grad) {
#ifdef FLEXCP_OPTIMIZER_FUSED
  if (fused_) {
    fused_grads_accumulate(grad, model_grad, grad_stale_);
    return;
  }
#endif
  if (grad_stale_) grad.copy_(model_grad);
  else grad.add_(model_grad);
  model_grad.zero_();
}

at::Tensor FlatAdamW::accumulate_grads_range(int64_t offset, int64_t numel) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(offset >= 0 && numel >= 0 && offset + numel <= grad_.numel(), "accumulate_grads_range: [", offset, ", ",
              offset + numel, ") is outside the ", grad_.numel(), " gradients");
  if (direct_ || grad_in_model_)
    throw std::logic_error("FlatAdamW: accumulate_grads_range with set_single_micro_batch on");
  grads_rebind(offset, offset + numel);
  at::Tensor range = grad_.narrow(0, offset, numel);
  if (!low_precision_) return range;
  // grad_stale_ stays set until accumulate_grads_ranges_done(): it tells every range of this
  // micro-batch to overwrite (the fused path's first accumulation), as accumulate_grads() does.
  model_grads_move(range, model_grad_flat_.narrow(0, offset, numel));
  return range;
}

void FlatAdamW::accumulate_grads_ranges_done() { grad_stale_ = false; }

at::Tensor FlatAdamW::clip_grad_norm(double max_norm) {
  at::NoGradGuard no_grad;
  // One read pass: torch's reduction runs at about memory bandwidth. A direct gradient is read in
  // bf16 and summed in fp32 (one kernel, no fp32 copy).
  auto norm = grad_in_model_ ? at::linalg_vector_norm(model_grad_flat_, 2, c10::nullopt, false, at::kFloat)
                             : grad_flat().norm(2);
  // A non-finite norm leaves the gradient as it is (no host sync to test it): scaling by NaN or 0
  // would hide which parameters went bad, and the trainer's numerics guard drops such a step anyway.
  clip_scale_ = max_norm > 0 ? at::where(at::isfinite(norm), (max_norm / (norm + 1e-6)).clamp_max(1.0), at::ones_like(norm))
                             : at::Tensor();
  return norm;
}

void FlatAdamW::step(double lr, const at::Tensor& skip) {
  at::NoGradGuard no_grad;
  if (!grad_in_model_) grad_flat();  // settles a stale gradient (step without accumulate_grads)
#ifdef FLEXCP_OPTIMIZER_FUSED
  if (fused_) {
    const AdamWScalars s = adamw_scalars(hyper_, lr, steps_ + 1);
    // Direct: the kernel reads the bf16 gradient and zeroes it (unless skip is set).
    fused_adamw_step(master_, exp_avg_, exp_avg_sq_, grad_in_model_ ? model_grad_flat_ : grad_,
                     low_precision_ ? model_flat_ : at::Tensor(), hyper_.weight_decay != 0 ? decay_numel_ : 0, s,
                     clip_scale_, skip);
    if (grad_in_model_) {
      grad_in_model_ = false;
      direct_stepped_ = true;
      direct_skip_ = skip;
    }
  } else
#endif
  {
    step_torch_ops(lr, skip);
  }
  ++steps_;
  clip_scale_ = at::Tensor();
}

// The reference path: torch element-wise ops, chunk by chunk.
void FlatAdamW::step_torch_ops(double lr, const at::Tensor& skip) {
  if (skip.defined() && skip.item<bool>()) return;  // a host sync, but only on this path
  const AdamWScalars s = adamw_scalars(hyper_, lr, steps_ + 1);
  const int64_t total = master_.numel();
  for (int64_t start = 0; start < total; start += kStepChunk) {
    const int64_t n = std::min(kStepChunk, total - start);
    auto w = master_.narrow(0, start, n), g = grad_.narrow(0, start, n);
    auto m = exp_avg_.narrow(0, start, n), v = exp_avg_sq_.narrow(0, start, n);
    if (clip_scale_.defined()) g = g * clip_scale_;
    const int64_t decayed = std::min(n, std::max<int64_t>(0, decay_numel_ - start));
    if (decayed > 0 && hyper_.weight_decay != 0) w.narrow(0, 0, decayed).mul_(s.decay_factor);
    m.mul_(s.beta1).add_(g, s.one_minus_beta1);
    v.mul_(s.beta2).addcmul_(g, g, s.one_minus_beta2);
    auto denom = v.sqrt().div_(s.bias2_sqrt).add_(s.eps);
    w.addcdiv_(m, denom, s.step_size);
  }
  refresh_model_params();
}

void FlatAdamW::refresh_model_params() {
  if (low_precision_) model_flat_.copy_(master_);
}

std::map<std::string, at::Tensor> FlatAdamW::state_tensors() const {
  std::map<std::string, at::Tensor> out;
  for (const auto& fp : params_) {
    const int64_t n = fp.param.numel();
    out["master." + fp.name] = master_.narrow(0, fp.offset, n).view(fp.param.sizes());
    out["exp_avg." + fp.name] = exp_avg_.narrow(0, fp.offset, n).view(fp.param.sizes());
    out["exp_avg_sq." + fp.name] = exp_avg_sq_.narrow(0, fp.offset, n).view(fp.param.sizes());
  }
  return out;
}

void FlatAdamW::load_state(const std::map<std::string, at::Tensor>& tensors, int64_t steps_taken) {
  at::NoGradGuard no_grad;
  auto dst = state_tensors();
  for (auto& [name, view] : dst) {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("optimizer state", "missing tensor '" + name + "'", "the checkpoint does not belong to this model");
    if (!it->second.sizes().equals(view.sizes()))
      fail("optimizer state", "tensor '" + name + "' has the wrong shape", "the checkpoint does not belong to this model");
    view.copy_(it->second);
  }
  steps_ = steps_taken;
  refresh_model_params();
}

}  // namespace flexcp
