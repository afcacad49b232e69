#include "core/cp_attention.h"

#include <ATen/ATen.h>

#include <limits>
#include <sstream>
#include <utility>

#include "core/errors.h"

namespace flexcp {

void attn_merge_into(at::Tensor& out1, at::Tensor& lse1, const at::Tensor& out2, const at::Tensor& lse2) {
  const at::Tensor l2 = lse2.to(at::kFloat);
  const at::Tensor m = at::maximum(lse1, l2);
  const at::Tensor m_safe = at::where(at::isinf(m), at::zeros_like(m), m);  // both parts empty: m = -inf
  const at::Tensor w1 = at::exp(lse1 - m_safe), w2 = at::exp(l2 - m_safe);  // exp(-inf) = 0
  const at::Tensor s = w1 + w2;
  const at::Tensor inv = at::where(s > 0, s.reciprocal(), at::zeros_like(s));
  out1 = out1 * (w1 * inv).unsqueeze(-1) + out2.to(at::kFloat) * (w2 * inv).unsqueeze(-1);
  lse1 = m_safe + at::log(s);  // log(0) = -inf for rows no part saw
}

void AttentionKernel::merge_into(AttnForward& acc, const AttnForward& part) {
  const bool same = acc.out.scalar_type() == part.out.scalar_type();
  at::Tensor out = acc.out.to(at::kFloat);
  attn_merge_into(out, acc.lse, part.out, part.lse);
  acc.out = same ? out.to(part.out.scalar_type()) : out;
}

int64_t cp_last_stage_with_work(const CpRankPlan& rp) {
  for (int64_t st = static_cast<int64_t>(rp.stages.size()) - 1; st >= 0; --st)
    if (!rp.stages[st].spec.slices.empty()) return st;
  return -1;
}

void StageForwardSum::add(int64_t stage, AttnForward part) {
  if (!acc.out.defined()) {
    acc = std::move(part);
    return;
  }
  if (stage != last) acc.out = acc.out.to(at::kFloat);  // more merges follow: no rounding in between
  kernel->merge_into(acc, part);
}

AttnForward StageForwardSum::result(const at::Tensor& q) const {
  if (!acc.out.defined())
    return {at::zeros(q.sizes(), q.options()),
            at::full({q.size(0), q.size(1)}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))};
  return {acc.out.to(q.scalar_type()), acc.lse};
}

void StageDqSum::add(int64_t stage, const at::Tensor& part) {
  if (!dq.defined()) {
    dq = part;
  } else if (stage == last) {
    dq = at::add(dq, part);  // bf16 + bf16: fp32 math, one rounding; fp32 + bf16: fp32
  } else {
    if (dq.scalar_type() != at::kFloat) dq = dq.to(at::kFloat);
    dq.add_(part);
  }
}

at::Tensor StageDqSum::result(const at::Tensor& q) const {
  return dq.defined() ? dq.to(q.scalar_type()) : at::zeros(q.sizes(), q.options());
}

namespace {

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

// Per-plan tensors that live on the device: the rows each stage sends.
struct StageIndex {
  std::shared_ptr<const CpPlan> plan;
  std::vector<at::Tensor> send;  // per stage
};

class CpAttentionKernel final : public AttentionKernel {
 public:
  CpAttentionKernel(std::shared_ptr<AttentionKernel> local, std::shared_ptr<CpContext> ctx)
      : local_(std::move(local)), ctx_(std::move(ctx)) {}

  std::string name() const override { return "cp(" + local_->name() + ")"; }

  AttnForward forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                      double scale) override {
    const CpRankPlan& rp = rank_plan(spec, q, k);
    const auto& idx = stage_index(q.device());
    const int64_t nst = static_cast<int64_t>(rp.stages.size());
    at::Tensor kv = at::stack({k, v}, 1);  // (n, 2, Hkv, D): one transfer carries both
    const int64_t row_bytes = 2 * k.size(1) * k.size(2) * static_cast<int64_t>(kv.element_size());

    std::vector<std::unique_ptr<CommWork>> cast(static_cast<size_t>(nst));
    auto start_cast = [&](int64_t st) {
      if (st >= nst) return;
      const CpStage& S = rp.stages[st];
      cast[st] = ctx_->group->all_to_all_v_async(kv.index_select(0, idx.send[st]), S.send_counts, S.recv_counts);
      ctx_->stats.forward_sent += static_cast<int64_t>(S.send_index.size()) * row_bytes;
      ctx_->stats.forward_received += S.buf.size() * row_bytes;
    };

    StageForwardSum sum{local_.get(), cp_last_stage_with_work(rp), {}};
    start_cast(1);
    for (int64_t st = 0; st < nst; ++st) {
      at::Tensor ks = k, vs = v;
      if (st > 0) {
        at::Tensor recv = cast[st]->wait();
        cast[st].reset();
        start_cast(st + 1);  // in flight while this stage computes
        ks = recv.select(1, 0).contiguous();
        vs = recv.select(1, 1).contiguous();
      }
      const CpStage& S = rp.stages[st];
      if (S.spec.slices.empty()) continue;
      sum.add(st, local_->forward(q, ks, vs, S.spec, scale));
    }
    ++ctx_->stats.forward_calls;
    return sum.result(q);
  }

  AttnGrads backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const AttentionSpec& spec, double scale) override {
    const CpRankPlan& rp = rank_plan(spec, q, k);
    const auto& idx = stage_index(q.device());
    const int64_t nst = static_cast<int64_t>(rp.stages.size());
    at::Tensor kv = at::stack({k, v}, 1);
    const int64_t row_bytes = 2 * k.size(1) * k.size(2) * static_cast<int64_t>(kv.element_size());
    // The local kernel's partial dK/dV are already rounded to k's dtype: they travel in it (no
    // information is lost) and are summed by their owner in fp32.
    const int64_t grad_row_bytes = row_bytes;

    std::vector<std::unique_ptr<CommWork>> cast(static_cast<size_t>(nst)), reduce(static_cast<size_t>(nst));
    auto start_cast = [&](int64_t st) {
      if (st >= nst) return;
      const CpStage& S = rp.stages[st];
      cast[st] = ctx_->group->all_to_all_v_async(kv.index_select(0, idx.send[st]), S.send_counts, S.recv_counts);
      ctx_->stats.backward_sent += static_cast<int64_t>(S.send_index.size()) * row_bytes;
      ctx_->stats.backward_received += S.buf.size() * row_bytes;
    };
    // dQ: the stages' parts (StageDqSum); dK/dV: this rank's own part plus what the other ranks
    // send back, in fp32.
    StageDqSum dq{cp_last_stage_with_work(rp), {}};
    at::Tensor dkv = at::zeros(kv.sizes(), kv.options().dtype(at::kFloat));
    auto finish_reduce = [&](int64_t st) {
      if (st < 1 || !reduce[st]) return;
      dkv.index_add_(0, idx.send[st], reduce[st]->wait().to(at::kFloat));
      reduce[st].reset();
    };

    start_cast(1);
    for (int64_t st = 0; st < nst; ++st) {
      const CpStage& S = rp.stages[st];
      at::Tensor ks = k, vs = v;
      if (st > 0) {
        at::Tensor recv = cast[st]->wait();
        cast[st].reset();
        start_cast(st + 1);
        ks = recv.select(1, 0).contiguous();
        vs = recv.select(1, 1).contiguous();
      }
      at::Tensor dkv_stage;
      if (!S.spec.slices.empty()) {
        AttnGrads g = local_->backward(dout, q, ks, vs, out, lse, S.spec, scale);
        dq.add(st, g.dq);
        dkv_stage = at::stack({g.dk, g.dv}, 1);
      } else {
        dkv_stage = at::zeros({ks.size(0), 2, ks.size(1), ks.size(2)}, kv.options());
      }
      if (st == 0) {
        dkv.add_(dkv_stage);
        continue;
      }
      // Group-reduce: partial dK/dV go back to the owners, the reverse of this stage's cast; it is in
      // flight while the next stage computes.
      reduce[st] = ctx_->group->all_to_all_v_async(dkv_stage.contiguous(), S.recv_counts, S.send_counts);
      ctx_->stats.backward_sent += S.buf.size() * grad_row_bytes;
      ctx_->stats.backward_received += static_cast<int64_t>(S.send_index.size()) * grad_row_bytes;
      finish_reduce(st - 1);
    }
    finish_reduce(nst - 1);
    ++ctx_->stats.backward_calls;
    return {dq.result(q), dkv.select(1, 0).to(k.scalar_type()).contiguous(),
            dkv.select(1, 1).to(v.scalar_type()).contiguous()};
  }

 private:
  const CpRankPlan& rank_plan(const AttentionSpec& spec, const at::Tensor& q, const at::Tensor& k) {
    if (spec.num_q % ctx_->cp != 0 || q.size(0) * ctx_->cp != spec.num_q)
      fail("context parallelism",
           "attention got " + std::to_string(q.size(0)) + " local queries for a global spec of " +
               std::to_string(spec.num_q) + " tokens on cp=" + std::to_string(ctx_->cp),
           "pass the global spec of the micro-batch and the tokens cp_dispatch_batch gave this rank");
    TORCH_CHECK(k.size(0) == q.size(0), "cp attention: k must hold this rank's tokens (", q.size(0), " rows)");
    auto plan = ctx_->planner->plan_for(spec);
    if (plan != index_.plan) {
      index_.plan = plan;
      index_.send.clear();
    }
    return plan->ranks[ctx_->cp_rank];
  }

  const StageIndex& stage_index(const at::Device& device) {
    if (index_.send.empty() || index_.send[0].device() != device) {
      index_.send.clear();
      for (const auto& S : index_.plan->ranks[ctx_->cp_rank].stages) index_.send.push_back(index_tensor(S.send_index, device));
    }
    return index_;
  }

  std::shared_ptr<AttentionKernel> local_;
  std::shared_ptr<CpContext> ctx_;
  StageIndex index_;
};

}  // namespace

std::shared_ptr<CpContext> cp_context_create(std::shared_ptr<Communicator> world, int64_t cp,
                                             const CpDispatchOptions& dispatch) {
  const int64_t ws = world->size();
  if (cp < 1 || ws % cp != 0)
    fail("parallel.cp", "cp=" + std::to_string(cp) + " does not divide the world size " + std::to_string(ws),
         "start a multiple of cp processes, or pick cp among the divisors of " + std::to_string(ws));
  auto ctx = std::make_shared<CpContext>();
  ctx->cp = cp;
  ctx->dp = ws / cp;
  ctx->cp_rank = world->rank() % cp;
  ctx->dp_rank = world->rank() / cp;
  ctx->world = world;
  ctx->group = cp == ws ? world : world->split(static_cast<int>(ctx->dp_rank), static_cast<int>(ctx->cp_rank));
  CpDispatchOptions o = dispatch;
  o.cp = cp;
  ctx->planner = std::make_shared<CpPlanner>(o);
  return ctx;
}

std::shared_ptr<AttentionKernel> make_cp_attention_kernel(std::shared_ptr<AttentionKernel> local,
                                                          std::shared_ptr<CpContext> ctx) {
  return std::make_shared<CpAttentionKernel>(std::move(local), std::move(ctx));
}

std::string cp_stats_report(const CpContext& ctx) {
  const auto& s = ctx.stats;
  const double mib = 1024.0 * 1024.0;
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(3);
  os << "cp rank " << ctx.cp_rank << " (dp " << ctx.dp_rank << "): per layer call, forward sent "
     << (s.forward_calls ? s.forward_sent / mib / s.forward_calls : 0.0) << " MiB, received "
     << (s.forward_calls ? s.forward_received / mib / s.forward_calls : 0.0) << " MiB; backward sent "
     << (s.backward_calls ? s.backward_sent / mib / s.backward_calls : 0.0) << " MiB, received "
     << (s.backward_calls ? s.backward_received / mib / s.backward_calls : 0.0) << " MiB (" << s.forward_calls
     << " forward, " << s.backward_calls << " backward calls)";
  return os.str();
}

}  // namespace flexcp
