// A C ABI over cuda/ffa.h for contiguous (T, H, D) tensors, so the kernels can be driven from Python
// (ctypes) for tests and benchmarks without LibTorch: scripts/bench/attention_bench.py and
// test/gpu/ffa_check.py load it from a shared library built with scripts/bench/build_ffa_lib.sh.
// Every function returns 0 on success, or 1 and a message in `err`.
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <vector>

#include "cuda/ffa.h"

namespace {

struct CPlan {
  ffa::Plan plan;
  ffa::DevicePlan dev;
  int32_t* buf = nullptr;
};

int report(const std::exception& e, char* err, int errlen) {
  if (err && errlen > 0) std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
  return 1;
}

ffa::TensorRef ref(void* p, int heads, int d) { return {p, static_cast<int64_t>(heads) * d, d}; }
ffa::LseRef lref(void* p, int heads) { return {static_cast<float*>(p), heads, 1}; }

}  // namespace

extern "C" {

// slices: n rows of (q_start, q_end, k_start, k_end, mask). fwd_tile_q: rows per q-side item, 0 for the
// default (ffa_c_forward_tile_q tells what a forward kernel needs).
void* ffa_c_plan_create(const int64_t* slices, int n, int64_t num_q, int64_t num_k, int fwd_tile_q, char* err,
                        int errlen) {
  try {
    std::vector<ffa::Slice> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i)
      v[i] = {slices[5 * i], slices[5 * i + 1], slices[5 * i + 2], slices[5 * i + 3],
              static_cast<ffa::Mask>(slices[5 * i + 4])};
    ffa::PlanConfig cfg;
    if (fwd_tile_q > 0) cfg.fwd_tile_q = fwd_tile_q;
    auto* cp = new CPlan;
    cp->plan = ffa::plan_build(v, num_q, num_k, cfg);
    const std::vector<int32_t> blob = ffa::plan_serialize(cp->plan, &cp->dev.layout);
    if (cudaMalloc(&cp->buf, blob.size() * 4) != cudaSuccess ||
        cudaMemcpy(cp->buf, blob.data(), blob.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
      delete cp;
      throw std::runtime_error("plan upload failed");
    }
    cp->dev.data = cp->buf;
    return cp;
  } catch (const std::exception& e) {
    report(e, err, errlen);
    return nullptr;
  }
}

int ffa_c_forward_tile_q(int kernel, int head_dim) { return ffa::forward_tile_q(kernel, head_dim); }

void ffa_c_plan_destroy(void* h) {
  auto* cp = static_cast<CPlan*>(h);
  if (!cp) return;
  cudaFree(cp->buf);
  delete cp;
}

// stats: visible_pairs, q items, q runs, q full tiles, q masked tiles, k items, k runs, k full, k masked
void ffa_c_plan_stats(void* h, int64_t* stats) {
  const auto& p = static_cast<CPlan*>(h)->plan;
  const int64_t v[9] = {p.visible_pairs,
                        static_cast<int64_t>(p.q_side.items.size()),
                        static_cast<int64_t>(p.q_side.runs.size()),
                        p.q_side.full_tiles,
                        p.q_side.masked_tiles,
                        static_cast<int64_t>(p.k_side.items.size()),
                        static_cast<int64_t>(p.k_side.runs.size()),
                        p.k_side.full_tiles,
                        p.k_side.masked_tiles};
  std::memcpy(stats, v, sizeof(v));
}

int ffa_c_forward(void* h, int dtype, int hq, int hkv, int d, void* q, void* k, void* v, void* out, void* lse,
                  float scale, int kernel, void* stream, char* err, int errlen) {
  try {
    auto* cp = static_cast<CPlan*>(h);
    ffa::ForwardArgs a;
    a.dims = {cp->plan.num_q, cp->plan.num_k, hq, hkv, d};
    a.dtype = static_cast<ffa::DType>(dtype);
    a.q = ref(q, hq, d), a.k = ref(k, hkv, d), a.v = ref(v, hkv, d), a.out = ref(out, hq, d);
    a.lse = lref(lse, hq);
    a.softmax_scale = scale;
    a.kernel = kernel;
    ffa::forward(a, cp->dev, static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

size_t ffa_c_workspace_bytes(int64_t num_q, int hq, int d, int deterministic) {
  ffa::Dims dims{num_q, 0, hq, hq, d};
  return ffa::backward_workspace_bytes(dims, deterministic != 0);
}

// kernel: BackwardArgs::kernel (5, the default there, or 1 or 2); every caller passes it.
int ffa_c_backward(void* h, int dtype, int hq, int hkv, int d, void* q, void* k, void* v, void* out, void* dout,
                   void* lse, void* dq, void* dk, void* dv, float scale, int deterministic, int kernel,
                   void* workspace, void* stream, char* err, int errlen) {
  try {
    auto* cp = static_cast<CPlan*>(h);
    ffa::BackwardArgs a;
    a.dims = {cp->plan.num_q, cp->plan.num_k, hq, hkv, d};
    a.dtype = static_cast<ffa::DType>(dtype);
    a.q = ref(q, hq, d), a.k = ref(k, hkv, d), a.v = ref(v, hkv, d), a.out = ref(out, hq, d);
    a.dout = ref(dout, hq, d), a.lse = lref(lse, hq);
    a.dq = ref(dq, hq, d), a.dk = ref(dk, hkv, d), a.dv = ref(dv, hkv, d);
    a.softmax_scale = scale;
    a.deterministic = deterministic != 0;
    a.kernel = kernel;
    a.workspace = workspace;
    ffa::backward(a, cp->dev, static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

int ffa_c_merge(int dtype, int64_t tokens, int heads, int d, void* o1, void* lse1, void* o2, void* lse2, void* out,
                void* lse, void* stream, char* err, int errlen) {
  try {
    ffa::MergeArgs a;
    a.num_tokens = tokens, a.heads = heads, a.head_dim = d, a.dtype = static_cast<ffa::DType>(dtype);
    a.o1 = ref(o1, heads, d), a.o2 = ref(o2, heads, d), a.out = ref(out, heads, d);
    a.lse1 = lref(lse1, heads), a.lse2 = lref(lse2, heads), a.lse = lref(lse, heads);
    ffa::merge(a, static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

}  // extern "C"
