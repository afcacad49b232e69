// Standalone GPU test of cuda/ffa.h with no LibTorch, small enough to run under compute-sanitizer
// (memcheck, racecheck): a few slices of every mask type over lengths that are not tile multiples,
// GQA 2, D 64 and 128, bf16; forward (kernels 0-3 and 5) and backward (kernels 1, 2 and 5, atomic and
// deterministic; the removed forward kernel 4 and backward kernels 0, 3 and 4 must be rejected) and
// merge, checked against a float64 CPU reference; the same slices with 256 query heads (more work tiles
// than SMs, so every CTA of the persistent forward kernel 5 runs several) for forward kernels 3 and 5;
// keys no query sees (a k-side item with no runs: dK = dV = 0) for backward kernel 5. Without --quick
// also: a longer backward case (GQA 4, runs of odd and even tile counts, many steps per CTA) for the TMA
// backward kernel 5, and a longer forward case (up to 11 key tiles per item, so the K/V rings wrap
// several times) for forward kernel 0, kernel 3 (v8, 192-row q tiles at D=64) and kernel 5 (v10, v8
// persistent), with 4 and with 128 query heads.
// Exit code 0 when every check passes.
//   scripts/bench/build_ffa_lib.sh && nvcc ... (see scripts/bench/build_ffa_lib.sh) && ./ffa_standalone
//   compute-sanitizer --tool racecheck ./ffa_standalone --quick   (--quick: the small cases only)
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/ffa.h"

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);    \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace {

using bf16 = __nv_bfloat16;

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { CK(cudaMalloc(&p, bytes ? bytes : 16)); }
  ~Dev() { cudaFree(p); }
};

std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = __bfloat162float(__float2bfloat16(x));
  return v;
}

bool visible(const std::vector<ffa::Slice>& sl, int i, int j) {
  for (const auto& s : sl) {
    if (i < s.q_start || i >= s.q_end || j < s.k_start || j >= s.k_end) continue;
    const int64_t a = i - s.q_start, b = j - s.k_start, d = (s.k_end - s.k_start) - (s.q_end - s.q_start);
    switch (s.mask) {
      case ffa::Mask::Full: return true;
      case ffa::Mask::Causal: return b <= a + d;
      case ffa::Mask::InvCausal: return b >= a;
      case ffa::Mask::BiCausal: return b >= a && b <= a + d;
    }
  }
  return false;
}

// n values drawn from N(0, 1), rounded to bf16 (so host and device see the same inputs).
std::vector<float> random_bf16(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return round_bf16(v);
}

// One row of the float64 reference forward: query i of head h against every visible key (GQA group
// h / g). Returns the softmax probabilities (0 for keys it does not see; all 0 for a row that sees
// none) and sets lse (-inf for such a row).
std::vector<double> reference_probs(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<ffa::Slice>& slices, int i, int h, int g, int hq, int hkv,
                                    int tk, int D, float scale, double& lse) {
  const int hk = h / g;
  std::vector<double> s(tk, -INFINITY);
  double mx = -INFINITY;
  for (int j = 0; j < tk; ++j)
    if (visible(slices, i, j)) {
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += double(q[(size_t(i) * hq + h) * D + d]) * k[(size_t(j) * hkv + hk) * D + d];
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
  double sum = 0;
  for (int j = 0; j < tk; ++j) sum += s[j] == -INFINITY ? 0 : std::exp(s[j] - mx);
  lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
  std::vector<double> p(tk, 0);
  for (int j = 0; j < tk; ++j) p[j] = s[j] == -INFINITY ? 0 : std::exp(s[j] - mx) / sum;
  return p;
}

// A device array of n bf16 or fp32 values, as floats.
std::vector<float> download(const void* dptr, size_t n, bool is_bf16) {
  std::vector<float> got(n);
  if (is_bf16) {
    std::vector<bf16> b(n);
    CK(cudaMemcpy(b.data(), dptr, b.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) got[i] = __bfloat162float(b[i]);
  } else {
    CK(cudaMemcpy(got.data(), dptr, got.size() * 4, cudaMemcpyDeviceToHost));
  }
  return got;
}

// Max |got - ref| against a float64 reference over the elements where `checked` is empty or true: -inf
// must match exactly, NaN (unwritten, poisoned outputs) never passes. Returns 1 on failure.
int compare_values(int D, const char* name, const std::vector<float>& got, const std::vector<double>& ref, double tol,
                   const std::vector<bool>& checked = {}) {
  double err = 0, mag = 0;
  for (size_t n = 0; n < ref.size(); ++n) {
    if (!checked.empty() && !checked[n]) continue;
    if (std::isinf(ref[n])) {
      if (!(std::isinf(got[n]) && got[n] < 0)) err = INFINITY;
      continue;
    }
    if (std::isnan(got[n])) err = INFINITY;  // unwritten (poisoned) or NaN math
    err = std::max(err, std::fabs(got[n] - ref[n]));
    mag = std::max(mag, std::fabs(ref[n]));
  }
  const bool ok = err <= tol * std::max(1.0, mag);
  std::printf("  D=%d %-22s max err %.3e (|ref| %.2f) %s\n", D, name, err, mag, ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

// The same for a device array (bf16 or fp32) against a float64 reference of every element.
int compare(int D, const char* name, const void* dptr, const std::vector<double>& ref, bool is_bf16, double tol) {
  return compare_values(D, name, download(dptr, ref.size(), is_bf16), ref, tol);
}

// Bitwise equality of two device arrays (kernel 5 runs kernel 3's arithmetic per work tile, in the same
// order, so its out and lse must be the same bits). Returns 1 on failure.
int compare_bitwise(int D, const char* name, const void* a, const void* b, size_t bytes) {
  std::vector<unsigned char> ha(bytes), hb(bytes);
  CK(cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost));
  size_t diff = 0;
  for (size_t n = 0; n < bytes; ++n) diff += ha[n] != hb[n];
  std::printf("  D=%d %-22s %zu of %zu bytes differ %s\n", D, name, diff, bytes, diff == 0 ? "ok" : "FAIL");
  return diff == 0 ? 0 : 1;
}

// The plan for the slices with q-side items of fwd_tile_q rows, on the device (freed with the struct).
struct PlanOnDevice {
  ffa::DevicePlan dev;
  Dev* blob = nullptr;
  PlanOnDevice(const std::vector<ffa::Slice>& slices, int64_t tq, int64_t tk, int fwd_tile_q) {
    ffa::PlanConfig cfg;
    cfg.fwd_tile_q = fwd_tile_q;
    const auto data = ffa::plan_serialize(ffa::plan_build(slices, tq, tk, cfg), &dev.layout);
    blob = new Dev(data.size() * 4);
    CK(cudaMemcpy(blob->p, data.data(), data.size() * 4, cudaMemcpyHostToDevice));
    dev.data = static_cast<const int32_t*>(blob->p);
  }
  ~PlanOnDevice() { delete blob; }
  PlanOnDevice(const PlanOnDevice&) = delete;
  PlanOnDevice& operator=(const PlanOnDevice&) = delete;
};

struct Case {
  int tq, tk, hq, hkv;
  std::vector<ffa::Slice> slices;
  std::vector<int> fwd_kernels;  // ForwardArgs::kernel values on the default plan; the last one feeds the backward
  std::vector<int> bwd_kernels;  // BackwardArgs::kernel values, each atomic and deterministic
  bool merge_split;              // also check two halves of the four slices merged (ffa::merge)
};

// Four slices of every mask type, lengths that are not tile multiples, GQA 2; every kernel.
Case small_case(int D) {
  return {150, 133, 4, 2,
          {{0, 70, 0, 60, ffa::Mask::Causal},
           {0, 150, 60, 133, ffa::Mask::InvCausal},
           {70, 150, 0, 40, ffa::Mask::Full},
           {70, 150, 40, 60, ffa::Mask::BiCausal}},
          {2, 1, 0}, {1, 2, 5}, D == 64};
}

// Longer backward: causal keys [0, 300) seen from row 290 on, a full block (rows [0, 250)) and an
// inverse-causal block (rows [290, 590)) on keys [300, 557), so rows 250-289 see no key. The k-side runs
// have 1, 2, 3 and 5 tiles (odd ones end the 128-query steps with a half step), start at rows 0, 192, 290,
// 418 and 546 (not 64-aligned), reach past the last row, and mix masked and full; GQA 4 gives each CTA 4
// query heads of them (steps of both parities, many of them). The TMA backward kernel (5) only.
Case long_backward_case() {
  return {590, 557, 8, 2,
          {{0, 590, 0, 300, ffa::Mask::Causal},
           {0, 250, 300, 557, ffa::Mask::Full},
           {290, 590, 300, 557, ffa::Mask::InvCausal}},
          {0}, {5}, false};
}

// Keys [200, 400) seen by no query: the k-side item of keys [256, 384) has no runs (dK = dV = 0 there,
// written over the 0xff fill), those of [128, 256) and [384, 512) have one of two slices. Backward kernel 5
// only.
Case unseen_keys_backward_case() {
  return {300, 600, 4, 2, {{0, 300, 0, 200, ffa::Mask::Causal}, {0, 300, 400, 600, ffa::Mask::Full}}, {0}, {5}, false};
}

int run(int D, const Case& c) {
  const int tq = c.tq, tk = c.tk, hq = c.hq, hkv = c.hkv, g = hq / hkv;
  const std::vector<ffa::Slice>& slices = c.slices;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::mt19937 rng(42 + D);
  auto q = random_bf16(rng, size_t(tq) * hq * D), k = random_bf16(rng, size_t(tk) * hkv * D),
       v = random_bf16(rng, size_t(tk) * hkv * D), dout = random_bf16(rng, size_t(tq) * hq * D);
  auto to_bf = [](const std::vector<float>& f) {
    std::vector<bf16> b(f.size());
    for (size_t n = 0; n < f.size(); ++n) b[n] = __float2bfloat16(f[n]);
    return b;
  };
  // float64 reference
  std::vector<double> ro(q.size()), rl(size_t(tq) * hq), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
  for (int h = 0; h < hq; ++h) {
    const int hk = h / g;
    for (int i = 0; i < tq; ++i) {
      const std::vector<double> p = reference_probs(q, k, slices, i, h, g, hq, hkv, tk, D, scale, rl[size_t(i) * hq + h]);
      double delta = 0;
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j < tk; ++j) o += p[j] * v[(size_t(j) * hkv + hk) * D + d];
        ro[(size_t(i) * hq + h) * D + d] = o;
        delta += o * dout[(size_t(i) * hq + h) * D + d];
      }
      for (int j = 0; j < tk; ++j) {
        if (p[j] == 0) continue;
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += double(dout[(size_t(i) * hq + h) * D + d]) * v[(size_t(j) * hkv + hk) * D + d];
        const double ds = p[j] * (dp - delta) * scale;
        for (int d = 0; d < D; ++d) {
          rdv[(size_t(j) * hkv + hk) * D + d] += p[j] * dout[(size_t(i) * hq + h) * D + d];
          rdq[(size_t(i) * hq + h) * D + d] += ds * k[(size_t(j) * hkv + hk) * D + d];
          rdk[(size_t(j) * hkv + hk) * D + d] += ds * q[(size_t(i) * hq + h) * D + d];
        }
      }
    }
  }

  Dev dq_(q.size() * 2), dk_(k.size() * 2), dv_(v.size() * 2), ddo(q.size() * 2), dout_(q.size() * 2),
      dlse(rl.size() * 4), gq(q.size() * 2), gk(k.size() * 2), gv(v.size() * 2);
  CK(cudaMemcpy(dq_.p, to_bf(q).data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk_.p, to_bf(k).data(), k.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv_.p, to_bf(v).data(), v.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ddo.p, to_bf(dout).data(), q.size() * 2, cudaMemcpyHostToDevice));

  const PlanOnDevice plan(slices, tq, tk, ffa::PlanConfig{}.fwd_tile_q);  // kernels 0-2 and every backward
  const ffa::DevicePlan& dp = plan.dev;

  ffa::ForwardArgs fa;
  fa.dims = {tq, tk, hq, hkv, D};
  fa.q = {dq_.p, hq * D, D}, fa.k = {dk_.p, hkv * D, D}, fa.v = {dv_.p, hkv * D, D};
  fa.out = {dout_.p, hq * D, D};
  fa.lse = {static_cast<float*>(dlse.p), hq, 1};
  fa.softmax_scale = scale;

  int failures = 0;
  auto check = [&](const char* name, const void* dptr, const std::vector<double>& ref, bool is_bf16, double tol) {
    failures += compare(D, name, dptr, ref, is_bf16, tol);
  };
  for (int kern : c.fwd_kernels) {  // the last (TMA, kernel 0) leaves the result the backward uses
    fa.kernel = kern;
    const char* names[] = {"out (tma)", "lse (tma)", "out (wgmma)", "lse (wgmma)", "out (mma)", "lse (mma)"};
    CK(cudaMemset(dout_.p, 0xff, q.size() * 2));  // poison: NaN
    ffa::forward(fa, dp, 0);
    CK(cudaDeviceSynchronize());
    check(names[2 * kern], dout_.p, ro, true, 2e-2);
    check(names[2 * kern + 1], dlse.p, rl, false, 1e-3);
  }
  // Kernels 3 (v8) and 5 (v10: v8 persistent) on their plan (192-row q tiles at D=64); the backward below
  // uses kernel 0's result.
  for (int kern : {3, 5}) {
    PlanOnDevice p3(slices, tq, tk, ffa::forward_tile_q(kern, D));
    ffa::ForwardArgs f3 = fa;
    f3.kernel = kern;
    Dev o3(q.size() * 2), l3(rl.size() * 4);
    f3.out = {o3.p, hq * D, D};
    f3.lse = {static_cast<float*>(l3.p), hq, 1};
    CK(cudaMemset(o3.p, 0xff, q.size() * 2));
    CK(cudaMemset(l3.p, 0xff, rl.size() * 4));
    ffa::forward(f3, p3.dev, 0);
    CK(cudaDeviceSynchronize());
    check(kern == 3 ? "out (v8)" : "out (v10)", o3.p, ro, true, 2e-2);
    check(kern == 3 ? "lse (v8)" : "lse (v10)", l3.p, rl, false, 1e-3);
    if (kern == 5) {  // the removed forward kernel 4 (v9) is rejected with a message saying so
      ffa::ForwardArgs removed = f3;
      removed.kernel = 4;
      std::string said = "nothing";
      try {
        ffa::forward(removed, p3.dev, 0);
      } catch (const std::exception& e) {
        said = e.what();
      }
      const bool ok = said.find("kernel 4") != std::string::npos && said.find("removed") != std::string::npos;
      std::printf("  D=%d forward kernel 4 rejected: %s\n", D, ok ? "ok" : ("FAIL (" + said + ")").c_str());
      failures += ok ? 0 : 1;
    }
  }
  // Every backward kernel of the case (1 wgmma, 2 mma.sync, 5 TMA with dQ writer warps (v8-bwd), the
  // default), each with atomic and deterministic dQ.
  for (int kern : c.bwd_kernels) {
    for (int det = 0; det < 2; ++det) {
      ffa::BackwardArgs ba;
      ba.dims = fa.dims;
      ba.q = fa.q, ba.k = fa.k, ba.v = fa.v, ba.out = fa.out, ba.lse = fa.lse;
      ba.dout = {ddo.p, hq * D, D};
      ba.dq = {gq.p, hq * D, D}, ba.dk = {gk.p, hkv * D, D}, ba.dv = {gv.p, hkv * D, D};
      ba.softmax_scale = scale;
      ba.deterministic = det;
      ba.kernel = kern;
      CK(cudaMemset(gq.p, 0xff, q.size() * 2));
      CK(cudaMemset(gk.p, 0xff, k.size() * 2));
      CK(cudaMemset(gv.p, 0xff, v.size() * 2));
      // A guard region past the workspace's end (the dQ accumulator is its last region): the dQ writers'
      // reductions of a last tile that reaches past num_q (bulk rows, or tensor boxes clipped by the tensor
      // map's bounds) must leave it untouched.
      const size_t ws_bytes = ffa::backward_workspace_bytes(ba.dims, det), guard_bytes = 64 * 1024;
      Dev ws(ws_bytes + guard_bytes);
      CK(cudaMemset(ws.p, 0xff, ws_bytes + guard_bytes));  // nothing may rely on zeros
      ba.workspace = ws.p;
      if (kern == 5 && !det) {
        // The default is 5; the removed kernels 0, 3 (v7 TMA) and 4 (ping-pong) are rejected with a
        // message saying so.
        const bool default_ok = ffa::BackwardArgs{}.kernel == 5;
        std::printf("  D=%d backward default kernel is 5: %s\n", D, default_ok ? "ok" : "FAIL");
        failures += default_ok ? 0 : 1;
        for (int gone : {0, 3, 4}) {
          ffa::BackwardArgs removed = ba;
          removed.kernel = gone;
          std::string said = "nothing";
          try {
            ffa::backward(removed, dp, 0);
          } catch (const std::exception& e) {
            said = e.what();
          }
          const bool ok = said.find("kernel " + std::to_string(gone)) != std::string::npos &&
                          said.find("removed") != std::string::npos;
          std::printf("  D=%d backward kernel %d rejected: %s\n", D, gone, ok ? "ok" : ("FAIL (" + said + ")").c_str());
          failures += ok ? 0 : 1;
        }
      }
      ffa::backward(ba, dp, 0);
      CK(cudaDeviceSynchronize());
      const char* kname[] = {"(removed)", "wgmma", "mma", "(removed)", "(removed)", "v8-bwd"};
      char nm[3][40];
      for (int x = 0; x < 3; ++x)
        std::snprintf(nm[x], sizeof nm[x], "%s (%s%s)", x == 0 ? "dq" : x == 1 ? "dk" : "dv", kname[kern],
                      det ? ", det" : "");
      {
        std::vector<unsigned char> guard(guard_bytes);
        CK(cudaMemcpy(guard.data(), static_cast<unsigned char*>(ws.p) + ws_bytes, guard_bytes, cudaMemcpyDeviceToHost));
        size_t touched = 0;
        for (unsigned char b : guard) touched += b != 0xff;
        std::printf("  D=%d workspace guard (%s%s): %s\n", D, kname[kern], det ? ", det" : "",
                    touched ? ("FAIL (" + std::to_string(touched) + " bytes written)").c_str() : "ok");
        failures += touched ? 1 : 0;
      }
      check(nm[0], gq.p, rdq, true, 2e-2);
      check(nm[1], gk.p, rdk, true, 2e-2);
      check(nm[2], gv.p, rdv, true, 2e-2);
    }
  }
  if (c.merge_split) {
    // Two halves of the slices, merged in place into the first: must equal the whole.
    const std::vector<ffa::Slice> s1 = {slices[0], slices[2]}, s2 = {slices[1], slices[3]};
    const PlanOnDevice p1(s1, tq, tk, ffa::PlanConfig{}.fwd_tile_q), p2(s2, tq, tk, ffa::PlanConfig{}.fwd_tile_q);
    Dev o2(q.size() * 2), l2(rl.size() * 4);
    ffa::forward(fa, p1.dev, 0);
    ffa::ForwardArgs fb = fa;
    fb.out = {o2.p, hq * D, D};
    fb.lse = {static_cast<float*>(l2.p), hq, 1};
    ffa::forward(fb, p2.dev, 0);
    ffa::MergeArgs ma;
    ma.num_tokens = tq, ma.heads = hq, ma.head_dim = D, ma.dtype = ffa::DType::BF16;
    ma.o1 = fa.out, ma.o2 = fb.out, ma.out = fa.out, ma.lse1 = fa.lse, ma.lse2 = fb.lse, ma.lse = fa.lse;
    ffa::merge(ma, 0);
    CK(cudaDeviceSynchronize());
    check("merged out", dout_.p, ro, true, 3e-2);
    check("merged lse", dlse.p, rl, false, 1e-3);
  }
  return failures;
}

// A forward-only case: shape, slices, the forward kernels to run (each on the plan it needs) and which
// query heads the float64 reference checks (h % ref_head_step == ref_head_step - 1: one head per kv head
// when ref_head_step is the GQA group; 1 = every head).
struct ForwardCase {
  const char* label;
  int tq, tk, hq, hkv;
  std::vector<ffa::Slice> slices;
  std::vector<int> kernels;
  int ref_head_step;
};

// The small case's slices with 256 query heads (GQA 128): 512 work tiles for the forward kernels 3 and 5,
// so that on an H100 (132 SMs) every CTA of kernel 5 runs 3 or 4 tiles back to back (the K/V ring, Q and
// the staging tile reused across tiles, the turn ring carried over). Small enough for racecheck.
ForwardCase many_heads_case() {
  return {"h256", 150, 133, 256, 2, small_case(64).slices, {3, 5}, 1};
}

// Items with many key tiles: rows [0, 300) see 1000-1300 keys (causal, bottom-right aligned), rows
// [300, 500) see a full block, an inverse-causal block and a diagonal band (three runs of different cuts
// per item, masked and unmasked), rows [500, 530) see nothing (out 0, lse -inf). GQA 2, 4 heads: kernels
// 0, 3 and 5 (5 with one tile per CTA); with 128 heads (GQA 16; 640 work tiles at D=64, 768 at D=128,
// 5-6 per CTA of kernel 5, among them the empty items) kernels 3 and 5, the reference on 8 heads.
ForwardCase long_case(int heads_q) {
  const std::vector<ffa::Slice> slices = {{0, 300, 0, 1300, ffa::Mask::Causal},
                                          {300, 500, 0, 700, ffa::Mask::Full},
                                          {300, 500, 700, 1100, ffa::Mask::InvCausal},
                                          {300, 500, 1100, 1300, ffa::Mask::BiCausal}};
  if (heads_q == 4) return {"long", 530, 1300, 4, 2, slices, {0, 3, 5}, 1};
  return {"long h128", 530, 1300, 128, 8, slices, {3, 5}, 16};
}

// Runs the case's forward kernels against the float64 reference (on the heads it names); when it runs
// both 3 and 5, their out and lse must also be the same bits.
int run_forward(int D, const ForwardCase& c) {
  const int tq = c.tq, tk = c.tk, hq = c.hq, hkv = c.hkv, g = hq / hkv;
  const std::vector<ffa::Slice>& slices = c.slices;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::mt19937 rng(7 + D + hq);
  const auto q = random_bf16(rng, size_t(tq) * hq * D), k = random_bf16(rng, size_t(tk) * hkv * D),
             v = random_bf16(rng, size_t(tk) * hkv * D);
  std::vector<double> ro(q.size(), 0), rl(size_t(tq) * hq, 0);
  std::vector<bool> o_checked(q.size(), false), l_checked(rl.size(), false);
  for (int h = c.ref_head_step - 1; h < hq; h += c.ref_head_step)
    for (int i = 0; i < tq; ++i) {
      const int hk = h / g;
      const std::vector<double> p = reference_probs(q, k, slices, i, h, g, hq, hkv, tk, D, scale, rl[size_t(i) * hq + h]);
      l_checked[size_t(i) * hq + h] = true;
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j < tk; ++j) o += p[j] * v[(size_t(j) * hkv + hk) * D + d];
        ro[(size_t(i) * hq + h) * D + d] = o;
        o_checked[(size_t(i) * hq + h) * D + d] = true;
      }
    }
  auto upload = [](const std::vector<float>& f, Dev& dst) {
    std::vector<bf16> b(f.size());
    for (size_t n = 0; n < f.size(); ++n) b[n] = __float2bfloat16(f[n]);
    CK(cudaMemcpy(dst.p, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  };
  Dev dq(q.size() * 2), dk(k.size() * 2), dv(v.size() * 2), dout(q.size() * 2), dlse(rl.size() * 4);
  Dev out3(q.size() * 2), lse3(rl.size() * 4);  // kernel 3's result, for the bitwise comparison with 5
  upload(q, dq);
  upload(k, dk);
  upload(v, dv);
  int failures = 0;
  bool have3 = false;
  for (int kern : c.kernels) {
    PlanOnDevice plan(slices, tq, tk, ffa::forward_tile_q(kern, D));
    ffa::ForwardArgs fa;
    fa.dims = {tq, tk, hq, hkv, D};
    fa.q = {dq.p, hq * D, D}, fa.k = {dk.p, hkv * D, D}, fa.v = {dv.p, hkv * D, D};
    fa.out = {dout.p, hq * D, D};
    fa.lse = {static_cast<float*>(dlse.p), hq, 1};
    fa.softmax_scale = scale;
    fa.kernel = kern;
    CK(cudaMemset(dout.p, 0xff, q.size() * 2));
    CK(cudaMemset(dlse.p, 0xff, rl.size() * 4));
    ffa::forward(fa, plan.dev, 0);
    CK(cudaDeviceSynchronize());
    const char* kname = kern == 0 ? "tma" : kern == 3 ? "v8" : "v10";
    const std::string on = std::string(c.label) + " out (" + kname + ")";
    const std::string ln = std::string(c.label) + " lse (" + kname + ")";
    failures += compare_values(D, on.c_str(), download(dout.p, ro.size(), true), ro, 2e-2, o_checked);
    failures += compare_values(D, ln.c_str(), download(dlse.p, rl.size(), false), rl, 1e-3, l_checked);
    if (kern == 3) {
      CK(cudaMemcpy(out3.p, dout.p, q.size() * 2, cudaMemcpyDeviceToDevice));
      CK(cudaMemcpy(lse3.p, dlse.p, rl.size() * 4, cudaMemcpyDeviceToDevice));
      have3 = true;
    } else if (kern == 5 && have3) {
      failures += compare_bitwise(D, (std::string(c.label) + " out v10 = v8").c_str(), dout.p, out3.p, q.size() * 2);
      failures += compare_bitwise(D, (std::string(c.label) + " lse v10 = v8").c_str(), dlse.p, lse3.p, rl.size() * 4);
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // the small cases only (racecheck)
  int failures = 0;
  try {
    for (int D : {64, 128}) {
      failures += run(D, small_case(D));
      failures += run(D, unseen_keys_backward_case());
      failures += run_forward(D, many_heads_case());
    }
    if (!quick)
      for (int D : {64, 128}) {
        failures += run(D, long_backward_case());
        failures += run_forward(D, long_case(4));
        failures += run_forward(D, long_case(128));
      }
  } catch (const std::exception& e) {
    std::printf("exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
