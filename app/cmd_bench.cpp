// `flexcp bench cp-attn`: context-parallel attention on the ranks of a launch, checked against the
// single-device result of the same local kernel and timed (docs/context-parallel.md, "Checking CP
// attention on N GPUs"). world = cp; any launcher:
//   mpirun -np 2 flexcp bench cp-attn --device cpu --backend reference --dtype fp32 --seq 512
//   mpirun -np 8 -x NCCL_NVLS_ENABLE=0 flexcp bench cp-attn --device cuda --backend ffa --seq 65536
//
// Every rank builds the same seeded global q, k, v, dout and spec, computes the single-device result
// on the whole sequence (no CP; it is also the single-device timing), runs its dispatched share
// through the CP kernel (forward and backward) and compares its rows of out, lse, dq, dk, dv. No
// gather: a rank only compares its own rows. Per-rank numbers are summed into one table on rank 0.
//
// Timing (median over --iters, after one warm-up call):
//   t_cp        the CP kernel (group-cast K/V, staged local kernels + merge, group-reduce dK/dV);
//   t_compute   the same local stages and merges on buffers of the same sizes, communication skipped;
//   t_comm      the same all-to-all-v collectives (same counts, bytes and order), no compute;
//   hidden = 1 - (t_cp - t_compute) / t_comm: the fraction of communication time that overlapped
//   with compute (1 = fully hidden, 0 = fully exposed; printed unclipped, n/a when t_comm = 0).
// Later benchmarks become more subcommands of `bench` in this file.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "app/command_registry.h"
#include "core/atomic_file.h"
#include "core/attention_backend.h"
#include "core/cp_attention.h"
#include "core/cp_dispatch.h"
#include "core/device_info.h"
#include "core/errors.h"
#include "core/rendezvous.h"

namespace flexcp {
namespace {

struct CpAttnOptions {
  std::string communicator = "auto";
  std::string device = "cpu";
  std::string backend = "reference";
  std::string dtype = "fp32";
  std::string mask = "causal";
  int64_t docs = 8;
  int64_t seq = 8192;
  int64_t heads_q = 32, heads_kv = 8, head_dim = 64;
  int64_t chunk = 0, stages = 0;
  int iters = 10;
  uint64_t seed = 1234;
  double tol = -1;        // < 0: the default of the dtype (fp32 1e-4, bf16 2e-2)
  bool fp32_ref = false;  // bf16: tolerance from the single-device bf16 error vs an fp32 reference
  std::string json;
  int perturb_rank = -1;  // hidden: add 1e-2 to this rank's dq (shows the check can fail)
};

// The documented bf16 tolerance (scaled error, see tensor_error): bf16 keeps 8 significant bits
// (eps 2^-8 = 3.9e-3); CP merges and sums dK/dV in fp32 and rounds once, so it differs from the
// single-device kernel by a few bf16 roundings of accumulations made in another order.
constexpr double kBf16Tolerance = 2e-2;
constexpr double kFp32Tolerance = 1e-4;

// max |a - b| / max(1, max |b|): absolute for values up to 1, relative above (dq, dk, dv grow with
// the sequence). -inf (rows with no visible key) must match -inf.
double tensor_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor fa = a.to(at::kFloat), fb = b.to(at::kFloat);
  const at::Tensor ia = at::isinf(fa), ib = at::isinf(fb);
  if (!at::equal(ia, ib)) return std::numeric_limits<double>::infinity();
  fa = at::where(ia, at::zeros_like(fa), fa);
  fb = at::where(ib, at::zeros_like(fb), fb);
  const double scale = std::max(1.0, fb.abs().max().item<double>());
  const double err = (fa - fb).abs().max().item<double>() / scale;
  return std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
}

// N packed documents of random lengths (at least 1 token each), the same on every rank.
AttentionSpec docs_spec(int64_t seq, int64_t docs, uint64_t seed) {
  if (docs < 1 || docs > seq) fail("bench cp-attn", "--docs " + std::to_string(docs) + " is out of range", "pass 1 <= --docs <= --seq");
  std::mt19937_64 rng(seed);
  std::vector<int64_t> cuts(static_cast<size_t>(seq - 1));
  for (int64_t i = 0; i < seq - 1; ++i) cuts[i] = i + 1;
  std::shuffle(cuts.begin(), cuts.end(), rng);
  std::vector<int64_t> starts{0};
  starts.insert(starts.end(), cuts.begin(), cuts.begin() + (docs - 1));
  std::sort(starts.begin(), starts.end());
  return spec_documents(starts, seq);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median wall time of f over `iters` calls after one warm-up; ranks start each call together.
template <class F>
double median_ms(int iters, const at::Device& dev, Communicator& comm, F&& f) {
  if (iters <= 0) return 0;
  f();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    device_synchronize(dev);
    comm.barrier();
    const double t0 = now_ms();
    f();
    device_synchronize(dev);
    ms.push_back(now_ms() - t0);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// The CP kernel's stages without communication: own keys, then each remote stage on a buffer of the
// rows it would have received; merges and dK/dV sums as the kernel does them.
struct ComputeOnly {
  std::shared_ptr<AttentionKernel> local;
  const CpRankPlan* rp = nullptr;
  std::vector<at::Tensor> ks, vs;  // per stage (stage 0: own k, v)
  double scale = 1;

  AttnForward forward(const at::Tensor& q) const {
    StageForwardSum sum{local.get(), cp_last_stage_with_work(*rp), {}};
    for (size_t st = 0; st < rp->stages.size(); ++st) {
      if (rp->stages[st].spec.slices.empty()) continue;
      sum.add(static_cast<int64_t>(st), local->forward(q, ks[st], vs[st], rp->stages[st].spec, scale));
    }
    return sum.result(q);
  }
  void backward(const at::Tensor& dout, const at::Tensor& q, const AttnForward& f) const {
    StageDqSum dq{cp_last_stage_with_work(*rp), {}};
    for (size_t st = 0; st < rp->stages.size(); ++st) {
      if (rp->stages[st].spec.slices.empty()) continue;
      AttnGrads g = local->backward(dout, q, ks[st], vs[st], f.out, f.lse, rp->stages[st].spec, scale);
      dq.add(static_cast<int64_t>(st), g.dq);
      (void)at::stack({g.dk, g.dv}, 1);  // the kernel's dK/dV packing
    }
    (void)dq.result(q);
  }
};

// The CP kernel's collectives without compute: forward K/V casts; backward casts + dK/dV reduces.
struct CommOnly {
  Communicator* group = nullptr;
  const CpRankPlan* rp = nullptr;
  std::vector<at::Tensor> send;  // per stage: kv rows sent (packed k and v, the kernel's dtype)
  std::vector<at::Tensor> grad;  // per stage: dK/dV of the stage's buffer (k's dtype, as the kernel sends them)

  void casts() const {
    for (size_t st = 1; st < rp->stages.size(); ++st) {
      const CpStage& S = rp->stages[st];
      group->all_to_all_v_async(send[st], S.send_counts, S.recv_counts)->wait();
    }
  }
  void reduces() const {
    for (size_t st = 1; st < rp->stages.size(); ++st) {
      const CpStage& S = rp->stages[st];
      group->all_to_all_v_async(grad[st], S.recv_counts, S.send_counts)->wait();
    }
  }
};

std::string fmt(double x, int prec = 3) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << x;
  return os.str();
}

// Per-rank figures, summed over ranks into a (ranks x fields) table.
enum Field {
  kOk, kErrOut, kErrLse, kErrDq, kErrDk, kErrDv, kTolOut, kTolLse, kTolDq, kTolDk, kTolDv,
  kCpF, kCpFB, kSingleF, kSingleFB, kCompF, kCompFB, kCommF, kCommFB,
  kFwdSent, kFwdRecv, kBwdSent, kBwdRecv, kArea, kNumFields
};

int cp_attn_run(const CpAttnOptions& o) {
  // NVLink multicast stays off (NVLS hangs/fails on the lent machines), also under mpirun without -x.
  ::setenv("NCCL_NVLS_ENABLE", "0", 1);
  ::setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
  ::setenv("NVSHMEM_DISABLE_NVLS", "1", 1);

  const bool cuda = o.device == "cuda";
  if (cuda && !device_cuda_available()) fail("bench cp-attn", "--device cuda but no CUDA device", "pass --device cpu");
  const LaunchEnv env = launch_env_detect();
  auto world = communicator_create(o.communicator, cuda, env);
  const int n = world->size(), r = world->rank();
  const at::Device dev = cuda ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(world->local_rank())) : at::Device(at::kCPU);
  const at::ScalarType dt = o.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  const int64_t S = o.seq, hq = o.heads_q, hkv = o.heads_kv, d = o.head_dim;
  if (hq % hkv != 0) fail("bench cp-attn", "--heads-q must be a multiple of --heads-kv", "e.g. --heads-q 32 --heads-kv 8");
  if (S % n != 0) fail("bench cp-attn", "--seq " + std::to_string(S) + " is not a multiple of the world size " + std::to_string(n), "pick --seq divisible by the number of ranks");
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  auto ctx = cp_context_create(world, n, {n, o.chunk, o.stages});
  const AttentionSpec spec = o.mask == "docs" ? docs_spec(S, o.docs, o.seed) : spec_causal(S);
  auto plan = ctx->planner->plan_for(spec);  // UserError when S is not a multiple of cp x chunk
  const CpRankPlan& rp = plan->ranks[r];

  // The same data on every rank: fp32 from a seeded CPU generator, then cast and moved.
  auto gen = at::detail::createCPUGenerator(o.seed);
  auto mk = [&](int64_t h) { return at::randn({S, h, d}, gen).to(dev, dt); };
  const at::Tensor q = mk(hq), k = mk(hkv), v = mk(hkv), dout = mk(hq);
  auto mine = [&](const at::Tensor& x) { return cp_dispatch_rows(*plan, r, x).contiguous(); };

  auto local = make_attention_kernel(o.backend);
  const AttnForward rf = local->forward(q, k, v, spec, scale);
  const AttnGrads rg = local->backward(dout, q, k, v, rf.out, rf.lse, spec, scale);
  const std::vector<at::Tensor> ref_rows{mine(rf.out), mine(rf.lse), mine(rg.dq), mine(rg.dk), mine(rg.dv)};

  std::vector<double> tol(5, o.tol >= 0 ? o.tol : (dt == at::kFloat ? kFp32Tolerance : kBf16Tolerance));
  if (o.fp32_ref && dt != at::kFloat && o.tol < 0) {
    // 2x the single-device bf16 error against an fp32 reference (exact kernel, O(Hq S^2) memory),
    // plus what CP adds on top: the local kernel hands each stage's partial out (and dK/dV) back in
    // bf16, rounded by up to 2^-9 of the largest value, and the merge then rounds once more.
    auto exact = make_reference_kernel();
    const at::Tensor q32 = q.to(at::kFloat), k32 = k.to(at::kFloat), v32 = v.to(at::kFloat), d32 = dout.to(at::kFloat);
    const AttnForward ef = exact->forward(q32, k32, v32, spec, scale);
    const AttnGrads eg = exact->backward(d32, q32, k32, v32, ef.out, ef.lse, spec, scale);
    const std::vector<std::pair<at::Tensor, at::Tensor>> single{
        {rf.out, ef.out}, {rf.lse, ef.lse}, {rg.dq, eg.dq}, {rg.dk, eg.dk}, {rg.dv, eg.dv}};
    const double cp_rounding = static_cast<double>(rp.stages.size() + 1) * std::ldexp(1.0, -9);
    for (size_t i = 0; i < single.size(); ++i) tol[i] = 2 * tensor_error(single[i].first, single[i].second) + cp_rounding;
  }

  const at::Tensor ql = mine(q), kl = mine(k), vl = mine(v), dl = mine(dout);
  auto kernel = make_cp_attention_kernel(local, ctx);
  const AttnForward f = kernel->forward(ql, kl, vl, spec, scale);
  AttnGrads g = kernel->backward(dl, ql, kl, vl, f.out, f.lse, spec, scale);
  const CpCommStats per_call = ctx->stats;  // one forward and one backward call so far
  if (r == o.perturb_rank) g.dq = g.dq + 1e-2;
  const std::vector<at::Tensor> cp_rows{f.out, f.lse, g.dq, g.dk, g.dv};

  std::vector<double> row(kNumFields, 0.0);
  bool ok = true;
  for (size_t i = 0; i < 5; ++i) {
    row[kErrOut + i] = tensor_error(cp_rows[i], ref_rows[i]);
    row[kTolOut + i] = tol[i];
    ok = ok && row[kErrOut + i] <= tol[i];
  }
  row[kOk] = ok ? 1 : 0;
  row[kFwdSent] = static_cast<double>(per_call.forward_sent);
  row[kFwdRecv] = static_cast<double>(per_call.forward_received);
  row[kBwdSent] = static_cast<double>(per_call.backward_sent);
  row[kBwdRecv] = static_cast<double>(per_call.backward_received);
  row[kArea] = static_cast<double>(rp.area);

  if (o.iters > 0) {
    Communicator& comm = *world;
    row[kSingleF] = median_ms(o.iters, dev, comm, [&] { local->forward(q, k, v, spec, scale); });
    row[kSingleFB] = median_ms(o.iters, dev, comm, [&] {
      const AttnForward a = local->forward(q, k, v, spec, scale);
      local->backward(dout, q, k, v, a.out, a.lse, spec, scale);
    });
    row[kCpF] = median_ms(o.iters, dev, comm, [&] { kernel->forward(ql, kl, vl, spec, scale); });
    row[kCpFB] = median_ms(o.iters, dev, comm, [&] {
      const AttnForward a = kernel->forward(ql, kl, vl, spec, scale);
      kernel->backward(dl, ql, kl, vl, a.out, a.lse, spec, scale);
    });

    ComputeOnly co{local, &rp, {kl}, {vl}, scale};
    CommOnly cm{ctx->group.get(), &rp, {at::Tensor()}, {at::Tensor()}};
    const at::Tensor kv = at::stack({kl, vl}, 1);
    for (size_t st = 1; st < rp.stages.size(); ++st) {
      const int64_t rows = rp.stages[st].buf.size();
      co.ks.push_back(at::randn({rows, hkv, d}, gen).to(dev, dt));
      co.vs.push_back(at::randn({rows, hkv, d}, gen).to(dev, dt));
      const at::Tensor idx = at::tensor(rp.stages[st].send_index, at::TensorOptions().dtype(at::kLong)).to(dev);
      cm.send.push_back(kv.index_select(0, idx).contiguous());
      cm.grad.push_back(at::zeros({rows, 2, hkv, d}, kv.options()));
    }
    row[kCompF] = median_ms(o.iters, dev, comm, [&] { co.forward(ql); });
    row[kCompFB] = median_ms(o.iters, dev, comm, [&] { co.backward(dl, ql, co.forward(ql)); });
    row[kCommF] = median_ms(o.iters, dev, comm, [&] { cm.casts(); });
    row[kCommFB] = median_ms(o.iters, dev, comm, [&] {
      cm.casts();  // forward
      cm.casts();  // the backward casts K/V again
      cm.reduces();
    });
  }

  // Gather every rank's row with one sum (each rank fills its own row of zeros).
  at::Tensor table = at::zeros({n, static_cast<int64_t>(kNumFields)}, at::TensorOptions().dtype(at::kDouble));
  auto cells = table.accessor<double, 2>();
  for (int i = 0; i < kNumFields; ++i) cells[r][i] = row[i];
  at::Tensor table_dev = table.to(dev);
  world->all_reduce_sum(table_dev);
  table = table_dev.cpu();
  auto at_ = [&](int rank, int field) { return table[rank][field].item<double>(); };
  bool all_ok = true;
  for (int p = 0; p < n; ++p) all_ok = all_ok && at_(p, kOk) > 0.5;

  std::cout << "rank " << r << "/" << n << ": max error out " << row[kErrOut] << " lse " << row[kErrLse] << " dq " << row[kErrDq]
            << " dk " << row[kErrDk] << " dv " << row[kErrDv] << " (tolerance " << tol[2] << ") " << (ok ? "OK" : "WRONG")
            << std::endl;
  world->barrier();
  if (r != 0) return all_ok ? 0 : 1;

  auto hidden = [n](double cp_ms, double comp_ms, double comm_ms) {
    return n > 1 && comm_ms > 0 ? 1.0 - (cp_ms - comp_ms) / comm_ms : std::numeric_limits<double>::quiet_NaN();
  };
  const double mib = 1024.0 * 1024.0;
  std::cout << "cp-attn: cp=" << n << " seq=" << S << " mask=" << o.mask << (o.mask == "docs" ? "(" + std::to_string(o.docs) + ")" : "")
            << " heads " << hq << "/" << hkv << " dim " << d << " backend=" << o.backend << " " << o.dtype << " on "
            << o.device << " (" << world->backend() << "), imbalance " << fmt(plan->imbalance()) << "\n";
  std::cout << "rank  err_out   err_lse   err_dq    err_dk    err_dv    ok  | fwd_ms  fwdbwd_ms tok/s/rank  comp_fb  comm_fb  hidden_fb | fwd MiB sent/recv  bwd MiB sent/recv\n";
  nlohmann::json ranks = nlohmann::json::array();
  std::vector<double> median_rank;
  for (int p = 0; p < n; ++p) {
    const double tps = at_(p, kCpFB) > 0 ? (S / n) / (at_(p, kCpFB) / 1e3) : 0;
    const double hid_f = hidden(at_(p, kCpF), at_(p, kCompF), at_(p, kCommF));
    const double hid_fb = hidden(at_(p, kCpFB), at_(p, kCompFB), at_(p, kCommFB));
    std::cout << std::setw(4) << p << "  " << std::scientific << std::setprecision(2);
    for (int i = kErrOut; i <= kErrDv; ++i) std::cout << at_(p, i) << "  ";
    std::cout << std::defaultfloat << (at_(p, kOk) > 0.5 ? "yes" : "NO ") << " | " << fmt(at_(p, kCpF)) << "  " << fmt(at_(p, kCpFB))
              << "  " << fmt(tps, 0) << "  " << fmt(at_(p, kCompFB)) << "  " << fmt(at_(p, kCommFB)) << "  " << fmt(hid_fb) << " | "
              << fmt(at_(p, kFwdSent) / mib) << "/" << fmt(at_(p, kFwdRecv) / mib) << "  " << fmt(at_(p, kBwdSent) / mib) << "/"
              << fmt(at_(p, kBwdRecv) / mib) << "\n";
    nlohmann::json j;
    j["rank"] = p;
    j["ok"] = at_(p, kOk) > 0.5;
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (int i = 0; i < 5; ++i) {
      j["error"][names[i]] = at_(p, kErrOut + i);
      j["tolerance"][names[i]] = at_(p, kTolOut + i);
    }
    j["cp_fwd_ms"] = at_(p, kCpF);
    j["cp_fwdbwd_ms"] = at_(p, kCpFB);
    j["compute_only_fwd_ms"] = at_(p, kCompF);
    j["compute_only_fwdbwd_ms"] = at_(p, kCompFB);
    j["comm_only_fwd_ms"] = at_(p, kCommF);
    j["comm_only_fwdbwd_ms"] = at_(p, kCommFB);
    j["hidden_fwd"] = std::isnan(hid_f) ? nlohmann::json(nullptr) : nlohmann::json(hid_f);
    j["hidden_fwdbwd"] = std::isnan(hid_fb) ? nlohmann::json(nullptr) : nlohmann::json(hid_fb);
    j["tokens_per_s"] = tps;
    j["single_fwd_ms"] = at_(p, kSingleF);
    j["single_fwdbwd_ms"] = at_(p, kSingleFB);
    j["bytes"] = {{"forward_sent", at_(p, kFwdSent)}, {"forward_received", at_(p, kFwdRecv)},
                  {"backward_sent", at_(p, kBwdSent)}, {"backward_received", at_(p, kBwdRecv)}};
    j["area"] = at_(p, kArea);
    ranks.push_back(j);
  }
  // The step waits for the slowest rank: report the max over ranks.
  double cp_fb = 0, cp_f = 0;
  for (int p = 0; p < n; ++p) {
    cp_fb = std::max(cp_fb, at_(p, kCpFB));
    cp_f = std::max(cp_f, at_(p, kCpF));
  }
  const double single_fb = at_(0, kSingleFB), single_f = at_(0, kSingleF);
  if (o.iters > 0)
    std::cout << "slowest rank: cp fwd " << fmt(cp_f) << " ms, fwd+bwd " << fmt(cp_fb) << " ms = "
              << fmt(cp_fb > 0 ? (S / n) / (cp_fb / 1e3) : 0, 0) << " tokens/s per rank; single device fwd " << fmt(single_f)
              << " ms, fwd+bwd " << fmt(single_fb) << " ms = " << fmt(single_fb > 0 ? S / (single_fb / 1e3) : 0, 0)
              << " tokens/s (speed-up " << fmt(cp_fb > 0 ? single_fb / cp_fb : 0, 2) << "x on " << n << " ranks)\n"
              << "hidden = 1 - (t_cp - t_compute_only) / t_comm_only (median ms per call; 1 = comm fully overlapped)\n";
  // Where communication is tiny next to compute, `hidden` is ill-conditioned (a negative value only
  // says the CP call costs more than its parts timed apart): the exposed time says it plainly.
  double exposed_fb = 0, comm_fb = 0;
  for (int p = 0; p < n; ++p) {
    exposed_fb = std::max(exposed_fb, at_(p, kCpFB) - at_(p, kCompFB));
    comm_fb = std::max(comm_fb, at_(p, kCommFB));
  }
  if (o.iters > 0 && n > 1)
    std::cout << "fwd+bwd beyond compute-only: " << fmt(exposed_fb) << " ms (" << fmt(cp_fb > 0 ? 100 * exposed_fb / cp_fb : 0, 1)
              << "% of the CP call; communication alone takes " << fmt(comm_fb) << " ms)\n";
  std::cout << (all_ok ? "cp-attn: OK" : "cp-attn: WRONG (an error above its tolerance)") << std::endl;

  if (!o.json.empty()) {
    nlohmann::json out;
    out["bench"] = "cp-attn";
    out["cp"] = n;
    out["seq"] = S;
    out["mask"] = o.mask;
    out["docs"] = o.mask == "docs" ? o.docs : 0;
    out["heads_q"] = hq;
    out["heads_kv"] = hkv;
    out["head_dim"] = d;
    out["backend"] = o.backend;
    out["dtype"] = o.dtype;
    out["device"] = o.device;
    out["communicator"] = world->backend();
    out["iters"] = o.iters;
    out["seed"] = o.seed;
    out["chunk_size"] = plan->chunk_size;
    out["imbalance"] = plan->imbalance();
    out["ok"] = all_ok;
    out["error_measure"] = "max|cp - single| / max(1, max|single|) over this rank's rows";
    out["hidden_definition"] = "1 - (t_cp - t_compute_only) / t_comm_only";
    out["slowest_cp_fwd_ms"] = cp_f;
    out["slowest_cp_fwdbwd_ms"] = cp_fb;
    out["exposed_fwdbwd_ms"] = exposed_fb;  // max over ranks of t_cp - t_compute_only
    out["tokens_per_s_per_rank"] = cp_fb > 0 ? (S / n) / (cp_fb / 1e3) : 0;
    out["single_fwd_ms"] = single_f;
    out["single_fwdbwd_ms"] = single_fb;
    out["ranks"] = ranks;
    write_file_atomic(o.json, out.dump(2) + "\n");
  }
  return all_ok ? 0 : 1;
}

void setup_bench(CLI::App& sub) {
  sub.require_subcommand(1);
  CLI::App* cp = sub.add_subcommand("cp-attn", "CP attention over the ranks of a launch vs the single-device kernel: check and timing");
  auto o = std::make_shared<CpAttnOptions>();
  cp->add_option("--seq", o->seq, "tokens of the sequence (a multiple of the world size)")->check(CLI::Range(int64_t{8}, int64_t{1} << 24));
  cp->add_option("--mask", o->mask, "causal | docs")->check(CLI::IsMember({"causal", "docs"}));
  cp->add_option("--docs", o->docs, "documents of random lengths packed in the sequence (--mask docs)");
  cp->add_option("--heads-q", o->heads_q, "query heads")->check(CLI::Range(1, 1024));
  cp->add_option("--heads-kv", o->heads_kv, "key/value heads")->check(CLI::Range(1, 1024));
  cp->add_option("--head-dim", o->head_dim, "head dimension")->check(CLI::Range(1, 1024));
  // Not "torch": SDPA has no separate forward/backward kernel with lse, which CP merges need.
  cp->add_option("--backend", o->backend, "local kernel: ffa (CUDA, bf16) | reference (exact, O(Hq S^2) memory)")
      ->check(CLI::IsMember({"ffa", "reference"}));
  cp->add_option("--device", o->device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cp->add_option("--dtype", o->dtype, "bf16 | fp32")->check(CLI::IsMember({"bf16", "fp32"}));
  cp->add_option("--iters", o->iters, "timed calls per measurement (median; 0 = check only)")->check(CLI::Range(0, 100000));
  cp->add_option("--seed", o->seed, "seed of q, k, v, dout and the document lengths");
  cp->add_option("--tol", o->tol, "tolerance of the scaled max error (default: fp32 1e-4, bf16 2e-2)");
  cp->add_flag("--fp32-ref", o->fp32_ref,
               "bf16: tolerance = 2 x (single-device bf16 error vs the exact fp32 reference kernel) + (stages + 1) x 2^-9; O(Hq S^2) memory");
  cp->add_option("--chunk", o->chunk, "dispatch chunk size (0 = default)");
  cp->add_option("--stages", o->stages, "remote stages (0 = default)");
  cp->add_option("--communicator", o->communicator, "auto | mpi | tcp | nccl | none");
  cp->add_option("--json", o->json, "rank 0 writes the results here (atomically)");
  cp->add_option("--perturb-rank", o->perturb_rank, "test only: add 1e-2 to this rank's dq")->group("");
  cp->callback([o] { command_exit_code() = cp_attn_run(*o); });
}

CommandRegistration reg("bench", "Benchmarks and checks over the ranks of a launch (bench cp-attn)", setup_bench);

}  // namespace
}  // namespace flexcp
