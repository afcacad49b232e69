// The training loop. One optimizer step = grad_accum micro-batches per rank, gradients summed over
// all ranks, the loss normalized by the global token count (so dp and cp layouts give the same
// update), clipping, AdamW, then metrics, validation and checkpoints.
#include "core/trainer.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "core/atomic_file.h"
#include "core/attention_backend.h"
#include "core/checkpoint.h"
#include "core/cp_run.h"
#include "core/data_loader.h"
#include "core/device_info.h"
#include "core/env_switch.h"
#include "core/errors.h"
#include "core/fault_inject.h"
#include "core/grad_reducer.h"
#include "core/hf_weights.h"
#include "core/llama_model.h"
#include "core/lr_schedule.h"
#include "core/metrics_log.h"
#include "core/micro_batch.h"
#include "core/numerics_guard.h"
#include "core/optimizer.h"
#include "core/rendezvous.h"
#include "core/run_consistency.h"
#include "core/step_profiler.h"

namespace flexcp {
namespace fs = std::filesystem;

namespace {

struct Runtime {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  int64_t world = 1, rank = 0;
  std::shared_ptr<Communicator> comm;  // every rank: gradients and the logged loss
  std::shared_ptr<CpContext> cp;       // cp groups, dispatch planner, CP traffic counters
  bool cp_on() const { return cp && cp->cp > 1; }
};

Runtime runtime_resolve(const RunConfig& cfg) {
  Runtime rt;
  const auto& t = cfg.train;
  const bool cuda = device_cuda_available();
  if (t.device == "cuda" && !cuda)
    fail(cfg.source, "train.device: cuda, but this build or machine has no CUDA GPU", "set train.device: cpu (or auto)");
  if (t.device == "cuda" || (t.device == "auto" && cuda)) rt.device = at::Device(at::kCUDA, 0);
  if (t.dtype == "bf16" || (t.dtype == "auto" && rt.device.is_cuda())) rt.dtype = at::kBFloat16;
  // Ranks: from the launcher (mpirun, torchrun, flexcp launch, Slurm); parallel settings are checked
  // before any collective, so a bad config fails fast with one line on every rank.
  const LaunchEnv env = launch_env_detect();
  cp_config_check(cfg, env.world_size, rt.device.is_cuda());
  if (rt.device.is_cuda()) rt.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  // Every collective from here on is watched: a dead or hung rank stops the others after
  // parallel.timeout_s with a line naming it, instead of a hang.
  rt.comm = communicator_create(cfg.parallel.communicator, rt.device.is_cuda(), env, cfg.parallel.timeout_s);
  rt.world = rt.comm->size();
  rt.rank = rt.comm->rank();
  // Ranks with different binaries, configs or data would train different things or hang: stop all.
  run_consistency_check(cfg, *rt.comm, rt.device);
  rt.cp = cp_context_for_run(cfg, rt.comm);
  return rt;
}

// FLOPs per token for MFU: 6N for the dense parts plus causal attention (6 * layers * S * Hq * D),
// the convention of the anchors (../shared/anchors) and the issue tracker.
double flops_per_token(const LlamaArch& a, int64_t params, int64_t seq_len) {
  return 6.0 * static_cast<double>(params) +
         6.0 * static_cast<double>(a.num_layers * seq_len * a.num_heads * a.head_dim);
}

class ValidationLoss {
 public:
  ValidationLoss(const RunConfig& cfg, const Runtime& rt) : cfg_(cfg), rt_(rt) {
    if (cfg.train.val_every > 0 && (cfg.data.synthetic || !cfg.data.path.empty()))
      loader_ = std::make_unique<DataLoader>(cfg.data, cfg.train.seq_len, cfg.model.arch.vocab_size, cfg.train.seed, "val");
  }
  bool due(int64_t step_done) const { return loader_ && cfg_.train.val_every > 0 && step_done % cfg_.train.val_every == 0; }
  double run(LlamaModel& model) {
    at::NoGradGuard no_grad;
    model->eval();
    double sum = 0;
    int64_t count = 0;
    for (int64_t b = 0; b < cfg_.train.val_batches; ++b) {
      std::vector<TokenWindow> windows;
      for (int64_t s = 0; s < cfg_.train.micro_batch; ++s) windows.push_back(loader_->window(b, s));
      auto mb = micro_batch_build(windows, cfg_.data.document_mask, rt_.device);
      if (rt_.cp_on()) {  // this rank's tokens; the sum and count come from the whole cp group below
        const CpBatch cb = cp_dispatch_batch(*rt_.cp, mb.spec, mb.tokens, mb.labels, mb.positions);
        mb.tokens = cb.tokens;
        mb.labels = cb.labels;
        mb.positions = cb.positions;
      }
      auto hidden = model->forward_hidden(mb.tokens, mb.positions, mb.spec);
      auto loss = llama_loss(*model, hidden, mb.labels);
      sum += loss.sum.item<double>();
      count += loss.count;
    }
    if (rt_.cp_on()) {
      at::Tensor both = at::tensor({sum, static_cast<double>(count)}, at::kDouble).to(rt_.device);
      rt_.cp->group->all_reduce_sum(both);
      both = both.to(at::kCPU);
      sum = both[0].item<double>();
      count = static_cast<int64_t>(both[1].item<double>());
    }
    model->train();
    return sum / std::max<int64_t>(1, count);
  }

 private:
  const RunConfig& cfg_;
  const Runtime& rt_;
  std::unique_ptr<DataLoader> loader_;
};

bool hf_folder_has_weights(const std::string& folder) {
  return fs::exists(fs::path(folder) / "model.safetensors") || fs::exists(fs::path(folder) / "model.safetensors.index.json");
}

NamedTensors model_tensors_for_checkpoint(const FlatAdamW& opt) {
  NamedTensors out;
  auto state = opt.state_tensors();
  for (const auto& fp : opt.params()) out.push_back({fp.name, state.at("master." + fp.name)});
  return out;
}

NamedTensors optimizer_tensors_for_checkpoint(const FlatAdamW& opt) {
  NamedTensors out;
  for (auto& [name, t] : opt.state_tensors())
    if (name.rfind("master.", 0) != 0) out.push_back({name, t});
  return out;
}

}  // namespace

int train_run(const RunConfig& cfg, const TrainOptions& opts) {
  const Runtime rt = runtime_resolve(cfg);
  const DerivedNumbers dn = config_derive(cfg, rt.world);
  const auto& t = cfg.train;
  const fs::path run_dir = cfg.logging.dir;
  const std::string ckpt_dir = cfg.checkpoint.dir.empty() ? (run_dir / "checkpoints").string() : cfg.checkpoint.dir;
  fs::create_directories(run_dir);
  if (rt.rank == 0 && !opts.config_text.empty()) write_file_atomic((run_dir / "config.yaml").string(), opts.config_text);

  // Model: fresh weights from the seed, or an HF folder's weights.
  at::manual_seed(static_cast<uint64_t>(t.seed));
  LlamaModel model(cfg.model.arch, cfg.model.init_std);
  if (!cfg.model.from.empty() && hf_folder_has_weights(cfg.model.from)) hf_load_weights(*model, cfg.model.from);
  model->to(rt.device, rt.dtype);
  model->set_activation_checkpointing(t.activation_checkpointing);
  // With cp > 1 the kernel of parallel.attention runs inside the CP kernel (group-cast of K/V,
  // staged merge, group-reduce of dK/dV); the model passes its local tokens and the global spec.
  if (rt.cp_on())
    model->set_attention_backend(
        backend_from_kernel(make_cp_attention_kernel(make_attention_kernel(cfg.parallel.attention), rt.cp)));
  else
    model->set_attention_backend(make_attention_backend(cfg.parallel.attention));
  model->train();
  FlatAdamW opt(model->named_parameters().pairs(), {t.beta1, t.beta2, t.eps, t.weight_decay});
  // One micro-batch per step on one rank: no fp32 gradient copy (the `accumulate grads` pass); the
  // update reads the model's bf16 gradients. More micro-batches or ranks sum them in fp32.
  // On the H100 (Llama-3.2-1B, seq 8192) this took the step from 164.8 to 163.1 ms: the 3.6 ms pass
  // and 0.8 ms of clip gone, the AdamW step unchanged at 13.3 ms. FLEXCP_OPTIM_DIRECT_GRADS=0 turns
  // it off (A/B, numerics questions).
  opt.set_single_micro_batch(dn.grad_accum == 1 && rt.world == 1 && env_switch("FLEXCP_OPTIM_DIRECT_GRADS", true));
  // More than one rank on NCCL (or FLEXCP_GRAD_OVERLAP=1 elsewhere): the gradient all-reduce runs bucket
  // by bucket during the last micro-batch's backward (core/grad_reducer.h) instead of over the whole
  // buffer after it (FLEXCP_GRAD_OVERLAP=0: after it; docs/performance.md has the A/B);
  // FLEXCP_GRAD_BUCKET_MB sets the bucket size. Collective: every rank.
  const std::unique_ptr<GradReducer> reducer = grad_reducer_for_run(opt, rt.comm, rt.device);
  if (reducer && rt.rank == 0 && !cfg.logging.quiet)
    spdlog::info("gradient all-reduce overlapped with the backward: {} buckets of up to {:.1f} MiB",
                 reducer->buckets().size(), static_cast<double>(reducer->bucket_bytes()) / double(1 << 20));

  // Resume: weights (fp32 master), moments and the step; the data order is a function of the step.
  int64_t start_step = 0;
  NumericsGuard guard(t, run_dir.string(), cfg.source);
  std::string resume_path = opts.resume_from;
  if (opts.resume && resume_path.empty()) {
    resume_path = checkpoint_find_latest(ckpt_dir);
    if (resume_path.empty()) spdlog::warn("--resume: no checkpoint in {}, starting from step 0", ckpt_dir);
  }
  if (!resume_path.empty()) {
    auto ck = checkpoint_load(resume_path);
    std::map<std::string, at::Tensor> state = ck.optimizer;
    for (auto& [name, tensor] : ck.model) state["master." + name] = tensor;
    opt.load_state(state, ck.state.value("optimizer_steps", ck.step));
    start_step = ck.step;
    guard.set_skipped(ck.state.value("skipped_steps", int64_t(0)));
    spdlog::info("resumed from {} at step {}", resume_path, start_step);
  }

  DataLoader loader(cfg.data, t.seq_len, cfg.model.arch.vocab_size, t.seed, "train", t.global_batch);
  ValidationLoss validation(cfg, rt);
  // Rank 0 alone owns the run folder's logs: another rank opening (and rewriting) the same file
  // would race with rank 0's writes.
  std::unique_ptr<MetricsLog> metrics;
  if (rt.rank == 0) metrics = std::make_unique<MetricsLog>((run_dir / "metrics.jsonl").string(), start_step, cfg.logging.csv);
  ConsoleProgress console(cfg.logging.quiet || rt.rank != 0);

  const int64_t per_rank = t.global_batch / dn.dp;
  const int64_t dp_rank = rt.rank / cfg.parallel.cp;
  const double total_tokens = static_cast<double>(t.global_batch * t.seq_len);
  const double flops_tok = flops_per_token(cfg.model.arch, dn.params, t.seq_len);
  const double peak_flops = device_peak_bf16_flops(rt.device);
  if (rt.rank == 0 && !cfg.logging.quiet)
    spdlog::info("training {} params on {} ({}), {} steps x {} tokens, grad accum {}, attention {}",
                 human_count(static_cast<double>(dn.params)), rt.device.str(), at::toString(rt.dtype), t.steps,
                 dn.tokens_per_step, dn.grad_accum, cfg.parallel.attention);

  LossOptions loss_opts;
  loss_opts.check_labels = false;  // no host sync mid-step: the data loader checked every token id
  StepProfiler profiler(rt.device, opts.profile_step);
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t step = start_step; step < t.steps; ++step) {
    fault_inject_at_step(rt.rank, step + 1);  // test hooks (FLEXCP_TEST_DIE_AT_STEP, FLEXCP_TEST_HANG_AT_STEP)
    device_reset_peak_memory(rt.device);
    const auto step_start = std::chrono::steady_clock::now();
    profiler.begin(step + 1);
    opt.zero_grad();
    auto loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(rt.device));
    for (int64_t micro = 0; micro < dn.grad_accum; ++micro) {
      std::vector<TokenWindow> windows;
      for (int64_t s = 0; s < t.micro_batch; ++s)
        windows.push_back(loader.window(step, dp_rank * per_rank + micro * t.micro_batch + s));
      auto mb = micro_batch_build(windows, cfg.data.document_mask, rt.device);
      if (rt.cp_on()) {
        const CpBatch cb = cp_dispatch_batch(*rt.cp, mb.spec, mb.tokens, mb.labels, mb.positions);
        if (step == start_step && micro == 0 && rt.rank == 0 && !cfg.logging.quiet)
          spdlog::info("{}", cp_comm_report(*cb.plan, cfg.model.arch.num_kv_heads, cfg.model.arch.head_dim,
                                            static_cast<int64_t>(at::elementSize(rt.dtype))));
        mb.tokens = cb.tokens;
        mb.labels = cb.labels;
        mb.positions = cb.positions;
      }
      profiler.mark("zero grad + data");
      auto hidden = model->forward_hidden(mb.tokens, mb.positions, mb.spec);
      profiler.mark("forward");
      auto loss = llama_loss(*model, hidden, mb.labels, loss_opts);
      profiler.mark("loss");
      // The last micro-batch's gradients go to the reducer, bucket by bucket, as they become final.
      const bool reduce_in_backward = reducer && micro + 1 == dn.grad_accum;
      if (reduce_in_backward) reducer->arm();
      (loss.sum / total_tokens).backward();
      profiler.mark("backward");
      if (!reduce_in_backward) opt.accumulate_grads();
      profiler.mark("accumulate grads");
      loss_sum += loss.sum.detach().to(at::kDouble);
    }
    // Each rank's gradient covers its tokens over the global token count: the sum over all ranks
    // is the no-CP, no-DP gradient of the global batch. With the reducer most of it is summed
    // already; here the rest is launched and waited for (the profile's "all-reduce" is that wait).
    if (rt.world > 1) {
      if (reducer) reducer->finish();
      else rt.comm->all_reduce_sum(opt.grad_flat());
      rt.comm->all_reduce_sum(loss_sum);
    }
    if (guard.inject_due(step + 1)) guard.inject(opt);  // test hook (FLEXCP_INJECT_NONFINITE)
    profiler.mark("all-reduce");
    auto grad_norm = opt.clip_grad_norm(t.grad_clip);
    profiler.mark("clip");
    const double lr = lr_at(t, step);

    // No host sync before the update: the device drops it when the loss or the gradient norm is not
    // finite (the numerics guard's skip), and the host reads loss, norm and that flag afterwards, in
    // one copy, for the guard (skip counter, stop with dump, spikes) and the log.
    const at::Tensor nonfinite = NumericsGuard::nonfinite_flag(loss_sum, grad_norm);
    opt.step(lr, nonfinite);
    profiler.mark("optimizer");
    const auto phases = profiler.end();
    const at::Tensor read = at::stack({loss_sum, grad_norm.to(at::kDouble), nonfinite.to(at::kDouble)}).to(at::kCPU);
    const double loss = read[0].item<double>() / total_tokens;
    const double gnorm = read[1].item<double>();
    const bool dropped = read[2].item<double>() != 0;
    std::vector<std::pair<int64_t, int64_t>> samples;
    for (int64_t s = 0; s < per_rank; ++s) samples.push_back({step, dp_rank * per_rank + s});
    const NumericsVerdict verdict = guard.check(step + 1, loss, gnorm, samples, opt);
    if (verdict.apply_update == dropped)
      throw std::logic_error("numerics guard and device flag disagree on step " + std::to_string(step + 1));
    if (dropped) opt.uncount_step();
    device_synchronize(rt.device);
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    const double tok_s = static_cast<double>(dn.tokens_per_step) / step_s;
    const double mfu = peak_flops > 0 ? flops_tok * tok_s / (peak_flops * static_cast<double>(rt.world)) : 0.0;
    const double mem_gib = device_peak_memory_bytes(rt.device) / double(1 << 30);
    nlohmann::json rec = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", gnorm},
                          {"tokens", (step + 1) * dn.tokens_per_step}, {"tokens_per_s", tok_s},
                          {"step_ms", step_s * 1e3}, {"mfu", mfu}, {"peak_mem_gib", mem_gib}};
    if (!verdict.apply_update) rec["skipped"] = true;
    // Buckets that went out during the backward (the rest waited for its end): a check that the
    // overlap happens at all (0 would mean the gradient hooks never fired).
    if (reducer) rec["grad_buckets_in_backward"] = reducer->launched_in_backward();
    if (!phases.empty()) {
      rec["profile_ms"] = nlohmann::json::array();  // [phase, ms] pairs, in the order they ran
      for (const auto& [name, ms] : phases) rec["profile_ms"].push_back({name, ms});
      if (rt.rank == 0) spdlog::info("step {} time by phase: {}", step + 1, step_profile_format(phases));
    }
    if (verdict.spike) rec["loss_spike"] = true;
    if (validation.due(step + 1)) rec["val_loss"] = validation.run(model);
    if (metrics) metrics->write(rec);
    if (rt.rank == 0) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
      const double eta = elapsed / static_cast<double>(step + 1 - start_step) * static_cast<double>(t.steps - step - 1);
      std::string line = fmt::format("step {:>5}/{} | loss {:.4f} | lr {:.2e} | gnorm {:.3f} | {} tok/s", step + 1,
                                     t.steps, loss, lr, gnorm, human_count(tok_s));
      if (mfu > 0) line += fmt::format(" | mfu {:.1f}%", 100 * mfu);
      if (mem_gib > 0) line += fmt::format(" | {:.1f} GiB", mem_gib);
      if (rec.contains("val_loss")) line += fmt::format(" | val {:.4f}", rec["val_loss"].get<double>());
      line += " | eta " + human_duration(eta);
      if ((step + 1) % cfg.logging.every == 0 || step + 1 == t.steps || rec.contains("val_loss")) console.line(line);
      else console.live(line);
    }
    const bool last = step + 1 == t.steps && cfg.checkpoint.at_end;
    if (rt.rank == 0 && (last || (cfg.checkpoint.every > 0 && (step + 1) % cfg.checkpoint.every == 0))) {
      nlohmann::json state = {{"optimizer_steps", opt.steps_taken()}, {"loss", loss}, {"seed", t.seed},
                              {"data_cursor", {{"step", step + 1}}}, {"skipped_steps", guard.skipped()}};
      auto path = checkpoint_save(ckpt_dir, step + 1, model_tensors_for_checkpoint(opt),
                                  optimizer_tensors_for_checkpoint(opt), state, cfg.checkpoint.keep_last);
      if (!cfg.logging.quiet) spdlog::info("saved checkpoint {}", path);
    }
  }
  if (rt.cp_on() && !cfg.logging.quiet) spdlog::info("{}", cp_stats_report(*rt.cp));
  return 0;
}

}  // namespace flexcp
