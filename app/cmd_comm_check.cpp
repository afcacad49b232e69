// `flexcp comm-check`: can the ranks of this launch talk? Rendezvous, then all-reduce, all-to-all-v
// and broadcast with known answers, then one context-parallel attention (forward and backward)
// over all ranks against the single-rank result. One line per rank; exit code 1 on a wrong answer.
//   mpirun -np 2 flexcp comm-check
//   flexcp launch --nproc-per-node 4 -- comm-check --device cuda
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <iostream>
#include <memory>
#include <sstream>

#include "app/command_registry.h"
#include "core/attention_backend.h"
#include "core/cp_attention.h"
#include "core/errors.h"
#include "core/rendezvous.h"

namespace flexcp {
namespace {

struct CheckOptions {
  std::string communicator = "auto";
  std::string device = "cpu";
  double mib = 16;
  int64_t tokens = 1024;
  double timeout_s = 600;  // like parallel.timeout_s
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int comm_check_run(const CheckOptions& o) {
  const bool cuda = o.device == "cuda";
  const LaunchEnv env = launch_env_detect();
  auto world = communicator_create(o.communicator, cuda, env, o.timeout_s);
  const at::Device dev = cuda ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(world->local_rank())) : at::Device(at::kCPU);
  const int n = world->size(), r = world->rank();
  bool ok = true;
  std::ostringstream line;
  line << "rank " << r << "/" << n << " (" << launch_env_describe(env) << "), " << world->backend() << " on " << dev;

  // all-reduce: every element is 1 + rank, the sum is n (n + 1) / 2.
  const int64_t elems = std::max<int64_t>(1, static_cast<int64_t>(o.mib * 1024 * 1024 / 4));
  at::Tensor t = at::full({elems}, 1.0f + r, at::TensorOptions().device(dev));
  world->barrier();
  auto t0 = std::chrono::steady_clock::now();
  world->all_reduce_sum(t);
  t.sum().item<double>();  // waits for the device
  const double ar_s = seconds_since(t0);
  ok = ok && at::equal(t, at::full({elems}, n * (n + 1) / 2.0f, t.options()));
  line << "; all_reduce " << o.mib << " MiB " << ar_s * 1e3 << " ms";

  // all-to-all-v: rank r sends p + 1 rows of value 100 r + p to rank p.
  std::vector<int64_t> sc(n), rc(n);
  std::vector<at::Tensor> parts;
  for (int p = 0; p < n; ++p) {
    sc[p] = p + 1;
    rc[p] = r + 1;
    parts.push_back(at::full({sc[p], 8}, 100.0f * r + p, at::TensorOptions().device(dev)));
  }
  at::Tensor got = world->all_to_all_v_async(at::cat(parts), sc, rc)->wait();
  std::vector<at::Tensor> want;
  for (int p = 0; p < n; ++p) want.push_back(at::full({rc[p], 8}, 100.0f * p + r, at::TensorOptions().device(dev)));
  ok = ok && at::equal(got, at::cat(want));

  std::vector<uint8_t> bytes;
  if (r == 0) bytes = {'f', 'l', 'e', 'x', 'c', 'p'};
  world->broadcast_bytes(bytes, 0);
  ok = ok && std::string(bytes.begin(), bytes.end()) == "flexcp";

  // Context-parallel attention over every rank, fp32, against the whole sequence on one rank.
  const int64_t T = o.tokens, hq = 4, hkv = 2, d = 32;
  if (T % (8 * n) != 0) fail("comm-check", "--tokens must be a multiple of 8 x world size");
  auto ctx = cp_context_create(world, n, {n, 0, 0});
  auto gen = at::detail::createCPUGenerator(42);
  auto mk = [&](int64_t h) { return at::randn({T, h, d}, gen).to(dev); };
  at::Tensor q = mk(hq), k = mk(hkv), v = mk(hkv), dout = mk(hq);
  AttentionSpec spec = spec_documents({0, T / 3, T / 3 + 7, T / 2}, T);
  auto ref = make_reference_kernel();
  const AttnForward rf = ref->forward(q, k, v, spec, 0.2);
  const AttnGrads rg = ref->backward(dout, q, k, v, rf.out, rf.lse, spec, 0.2);
  auto plan = ctx->planner->plan_for(spec);
  auto mine = [&](const at::Tensor& x) { return cp_dispatch_rows(*plan, r, x).contiguous(); };
  auto kernel = make_cp_attention_kernel(ref, ctx);
  t0 = std::chrono::steady_clock::now();
  const AttnForward f = kernel->forward(mine(q), mine(k), mine(v), spec, 0.2);
  const AttnGrads g = kernel->backward(mine(dout), mine(q), mine(k), mine(v), f.out, f.lse, spec, 0.2);
  g.dv.sum().item<double>();
  const double cp_s = seconds_since(t0);
  double diff = 0;
  const std::vector<std::pair<at::Tensor, at::Tensor>> pairs{
      {f.out, rf.out}, {f.lse, rf.lse}, {g.dq, rg.dq}, {g.dk, rg.dk}, {g.dv, rg.dv}};
  for (const auto& [a, b] : pairs) diff = std::max(diff, (a - mine(b)).abs().max().item<double>());
  ok = ok && diff < 1e-4;
  line << "; cp attention (" << T << " tokens, cp=" << n << ") max diff " << diff << ", " << cp_s * 1e3 << " ms";
  line << (ok ? "; OK" : "; WRONG");
  std::cout << line.str() << std::endl;
  return ok ? 0 : 1;
}

void setup_comm_check(CLI::App& sub) {
  auto o = std::make_shared<CheckOptions>();
  sub.add_option("--communicator", o->communicator, "auto | mpi | tcp | nccl | none");
  sub.add_option("--device", o->device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  sub.add_option("--mib", o->mib, "size of the all-reduce in MiB")->check(CLI::Range(0.0, 4096.0));
  sub.add_option("--tokens", o->tokens, "sequence length of the attention check")->check(CLI::Range(8, 1 << 16));
  sub.add_option("--timeout", o->timeout_s,
                 "seconds a collective may wait for the other ranks before this rank names the late one and exits "
                 "with code 3 (0 = no limit; like parallel.timeout_s)")
      ->check(CLI::Range(0.0, 1e9));
  sub.callback([o] { command_exit_code() = comm_check_run(*o); });
}

CommandRegistration reg("comm-check", "Check that the ranks of a launch can communicate (and run CP attention)",
                        setup_comm_check);

}  // namespace
}  // namespace flexcp
