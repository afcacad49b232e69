// The `ffa` AttentionKernel: our CUDA flexible flash attention (cuda/ffa.h) over LibTorch tensors.
// backend_from_kernel (attention_autograd.cpp) makes it differentiable. The plan for a spec is built on
// the host and copied to the device once; forward and backward of the same spec reuse it (cache of the
// last few specs per device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <list>
#include <mutex>

#include "core/attention_ffa.h"
#include "core/env_switch.h"
#include "core/errors.h"
#include "cuda/ffa.h"

namespace flexcp {
namespace {

struct CachedPlan {
  std::vector<AttnSlice> slices;
  int64_t num_q = 0, num_k = 0;
  int device = -1;
  int fwd_tile_q = 0;  // rows per forward q tile (PlanConfig::fwd_tile_q)
  ffa::Plan plan;
  ffa::PlanLayout layout;
  at::Tensor blob;  // int32 on the device
};

bool same_spec(const CachedPlan& c, const AttentionSpec& s, int device, int fwd_tile_q) {
  if (c.device != device || c.fwd_tile_q != fwd_tile_q || c.num_q != s.num_q || c.num_k != s.num_k || c.slices.size() != s.slices.size())
    return false;
  for (size_t n = 0; n < s.slices.size(); ++n) {
    const auto &a = c.slices[n], &b = s.slices[n];
    if (!(a.q == b.q) || !(a.k == b.k) || a.mask != b.mask) return false;
  }
  return true;
}

ffa::DType dtype_of(const at::Tensor& t, const char* where) {
  if (t.scalar_type() == at::kBFloat16) return ffa::DType::BF16;
  if (t.scalar_type() == at::kHalf) return ffa::DType::FP16;
  fail(where, std::string("tensor dtype ") + c10::toString(t.scalar_type()) + " is not supported by the ffa kernels",
       "use bf16 or fp16 (train.dtype: bf16)");
}

// The kernels need the last dimension contiguous, 16-byte aligned rows and strides in multiples of 8.
at::Tensor kernel_layout(const at::Tensor& t) {
  const bool ok = t.dim() == 3 && t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

ffa::TensorRef ref(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
ffa::LseRef lse_ref(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

class FfaKernel : public AttentionKernel {
 public:
  explicit FfaKernel(FfaOptions opts) : opts_(opts) {}
  std::string name() const override { return "ffa"; }

  AttnForward forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                      const AttentionSpec& spec, double scale) override {
    const char* where = "attention ffa forward";
    check_inputs(where, q_in, k_in, v_in, spec);
    const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
    c10::cuda::CUDAGuard guard(q.device());
    const PlanOnDevice cp = plan_for(spec, q.device(), ffa::forward_tile_q(opts_.forward_kernel, q.size(2)));
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
    ffa::ForwardArgs a;
    a.dims = dims(q, k);
    a.dtype = dtype_of(q, where);
    a.q = ref(q), a.k = ref(k), a.v = ref(v), a.out = ref(out), a.lse = lse_ref(lse);
    a.softmax_scale = static_cast<float>(scale);
    a.kernel = opts_.forward_kernel;
    ffa::forward(a, {cp.blob.data_ptr<int32_t>(), cp.layout}, at::cuda::getCurrentCUDAStream());
    return {out, lse};
  }

  // Two parts of one dtype (what CP's single remote stage gives): one fused pass (cuda/ffa_merge.cu)
  // in fp32, written over acc's tensors. Anything else: the torch ops of the base class.
  void merge_into(AttnForward& acc, const AttnForward& part) override {
    const at::Tensor &o1 = acc.out, &o2 = part.out;
    const bool fused = o1.is_cuda() && o2.device() == o1.device() && o1.scalar_type() == o2.scalar_type() &&
                       (o1.scalar_type() == at::kBFloat16 || o1.scalar_type() == at::kHalf) && o1.dim() == 3 &&
                       o1.sizes() == o2.sizes() && o1.stride(2) == 1 && o2.stride(2) == 1 &&
                       acc.lse.scalar_type() == at::kFloat && part.lse.scalar_type() == at::kFloat &&
                       acc.lse.dim() == 2 && part.lse.dim() == 2;
    if (!fused) return AttentionKernel::merge_into(acc, part);
    c10::cuda::CUDAGuard guard(o1.device());
    ffa::MergeArgs m;
    m.num_tokens = o1.size(0);
    m.heads = static_cast<int32_t>(o1.size(1));
    m.head_dim = static_cast<int32_t>(o1.size(2));
    m.dtype = dtype_of(o1, "attention ffa merge");
    m.o1 = ref(o1), m.o2 = ref(o2), m.out = ref(o1);
    m.lse1 = lse_ref(acc.lse), m.lse2 = lse_ref(part.lse), m.lse = lse_ref(acc.lse);
    ffa::merge(m, at::cuda::getCurrentCUDAStream());
  }

  AttnGrads backward(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                     const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
                     const AttentionSpec& spec, double scale) override {
    const char* where = "attention ffa backward";
    check_inputs(where, q_in, k_in, v_in, spec);
    const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
    const at::Tensor out = kernel_layout(out_in), dout = kernel_layout(dout_in.to(q.scalar_type()));
    const at::Tensor lse_f = lse.to(at::kFloat);
    c10::cuda::CUDAGuard guard(q.device());
    // The backward reads the plan's q side only when deterministic, and then needs the default tiles;
    // otherwise the forward's plan serves (one cache entry per spec).
    const int tile_q = opts_.deterministic ? ffa::PlanConfig{}.fwd_tile_q
                                           : ffa::forward_tile_q(opts_.forward_kernel, q.size(2));
    const PlanOnDevice cp = plan_for(spec, q.device(), tile_q);
    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    ffa::BackwardArgs a;
    a.dims = dims(q, k);
    a.dtype = dtype_of(q, where);
    a.q = ref(q), a.k = ref(k), a.v = ref(v), a.out = ref(out), a.dout = ref(dout), a.lse = lse_ref(lse_f);
    a.dq = ref(dq), a.dk = ref(dk), a.dv = ref(dv);
    a.softmax_scale = static_cast<float>(scale);
    a.deterministic = opts_.deterministic;
    a.kernel = opts_.backward_kernel;
    const size_t ws_bytes = ffa::backward_workspace_bytes(a.dims, a.deterministic);
    at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 256))}, q.options().dtype(at::kByte));
    a.workspace = ws.data_ptr();
    ffa::backward(a, {cp.blob.data_ptr<int32_t>(), cp.layout}, at::cuda::getCurrentCUDAStream());
    return {dq, dk, dv};
  }

 private:
  static ffa::Dims dims(const at::Tensor& q, const at::Tensor& k) {
    return {q.size(0), k.size(0), static_cast<int32_t>(q.size(1)), static_cast<int32_t>(k.size(1)),
            static_cast<int32_t>(q.size(2))};
  }

  static void check_inputs(const char* where, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const AttentionSpec& spec) {
    if (!q.is_cuda() || !k.is_cuda() || !v.is_cuda())
      fail(where, "q, k and v must be CUDA tensors", "use attention: reference on the CPU");
    if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)
      fail(where, "q, k, v must be (tokens, heads, head_dim)");
    if (k.sizes() != v.sizes()) fail(where, "k and v shapes differ");
    if (q.size(2) != k.size(2)) fail(where, "q and k head_dim differ");
    if (q.scalar_type() != k.scalar_type() || q.scalar_type() != v.scalar_type())
      fail(where, "q, k, v dtypes differ");
    if (q.size(0) != spec.num_q || k.size(0) != spec.num_k)
      fail(where, "spec is for " + std::to_string(spec.num_q) + " queries and " + std::to_string(spec.num_k) +
                      " keys but q has " + std::to_string(q.size(0)) + " and k " + std::to_string(k.size(0)));
  }

  // By value: another thread may evict the cache entry once the lock is released.
  struct PlanOnDevice {
    at::Tensor blob;
    ffa::PlanLayout layout;
  };
  PlanOnDevice plan_for(const AttentionSpec& spec, const at::Device& device, int fwd_tile_q) {
    std::lock_guard<std::mutex> lock(mu_);
    const int dev = device.index();
    for (auto it = cache_.begin(); it != cache_.end(); ++it)
      if (same_spec(*it, spec, dev, fwd_tile_q)) {
        cache_.splice(cache_.begin(), cache_, it);  // most recent first
        return {cache_.front().blob, cache_.front().layout};
      }
    CachedPlan c;
    c.slices = spec.slices;
    c.num_q = spec.num_q;
    c.num_k = spec.num_k;
    c.device = dev;
    c.fwd_tile_q = fwd_tile_q;
    std::vector<ffa::Slice> slices;
    slices.reserve(spec.slices.size());
    for (const auto& s : spec.slices)
      slices.push_back({s.q.start, s.q.end, s.k.start, s.k.end, static_cast<ffa::Mask>(static_cast<int32_t>(s.mask))});
    ffa::PlanConfig config;
    config.fwd_tile_q = fwd_tile_q;
    c.plan = ffa::plan_build(slices, spec.num_q, spec.num_k, config);
    std::vector<int32_t> blob = ffa::plan_serialize(c.plan, &c.layout);
    c.blob = at::from_blob(blob.data(), {static_cast<int64_t>(blob.size())}, at::kInt).to(device);
    cache_.push_front(std::move(c));
    if (cache_.size() > kCacheSize) cache_.pop_back();
    return {cache_.front().blob, cache_.front().layout};
  }

  static constexpr size_t kCacheSize = 8;  // forward + backward of a few layers' specs (CP stages)
  FfaOptions opts_;
  std::mutex mu_;
  std::list<CachedPlan> cache_;
};

}  // namespace

std::shared_ptr<AttentionKernel> make_ffa_kernel(const FfaOptions& opts) { return std::make_shared<FfaKernel>(opts); }

std::shared_ptr<AttentionKernel> make_ffa_kernel() {
  FfaOptions opts;
  opts.deterministic = env_switch("FLEXCP_FFA_DETERMINISTIC", false);
  opts.forward_kernel = static_cast<int>(env_int("FLEXCP_FFA_FWD_KERNEL", opts.forward_kernel));
  opts.backward_kernel = static_cast<int>(env_int("FLEXCP_FFA_BWD_KERNEL", opts.backward_kernel));
  return make_ffa_kernel(opts);
}

}  // namespace flexcp
