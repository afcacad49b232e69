// Our Llama against HF transformers: fixtures made by test/fixtures/make_llama_fixtures.py
// (transformers 5.17, torch 2.11, CPU fp32). Logits, loss, gradients and a 20-step AdamW run must
// match within 1e-4 for a tied and an untied model with GQA and Llama 3 rope scaling.
#include <ATen/ATen.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/attention_backend.h"
#include "core/errors.h"
#include "core/hf_config.h"
#include "core/hf_weights.h"
#include "core/llama_model.h"
#include "core/lr_schedule.h"
#include "core/optimizer.h"
#include "core/rope.h"
#include "core/safetensors.h"

using namespace flexcp;

namespace {

const std::string kFixtures = std::string(FLEXCP_SOURCE_DIR) + "/test/fixtures/llama";

// Dense attention through plain differentiable ATen ops: a reference independent of the project's
// kernels (which have their own tests), so this file tests the model alone.
class DenseTestAttention : public AttentionBackend {
 public:
  std::string name() const override { return "dense-test"; }
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                    double scale) override {
    const int64_t Tq = q.size(0), Tk = k.size(0), Hq = q.size(1), Hkv = k.size(1);
    std::vector<uint8_t> m(static_cast<size_t>(Tq * Tk), 0);
    for (const auto& s : spec.slices)
      for (int64_t i = s.q.start; i < s.q.end; ++i)
        for (int64_t j = s.k.start; j < s.k.end; ++j)
          if (slice_visible(s, i, j)) m[static_cast<size_t>(i * Tk + j)] = 1;
    at::Tensor mask = at::from_blob(m.data(), {Tq, Tk}, at::kByte).clone().to(at::kBool);
    at::Tensor kk = k.repeat_interleave(Hq / Hkv, 1), vv = v.repeat_interleave(Hq / Hkv, 1);
    at::Tensor scores = at::einsum("qhd,khd->hqk", {q.to(at::kFloat), kk.to(at::kFloat)}) * scale;
    scores = scores.masked_fill(mask.logical_not().unsqueeze(0), -INFINITY);
    at::Tensor p = at::softmax(scores, -1);
    return at::einsum("hqk,khd->qhd", {p, vv.to(at::kFloat)}).to(q.scalar_type());
  }
};

struct Fixture {
  std::string dir;
  LlamaArch arch;
  SafetensorsSet expected;
  nlohmann::json info;
};

Fixture load_fixture(const std::string& name) {
  Fixture f;
  f.dir = kFixtures + "/" + name;
  f.arch = hf_config_read(f.dir);
  f.expected = SafetensorsSet::open(f.dir + "/expected.safetensors");
  std::ifstream in(kFixtures + "/expected.json");
  f.info = nlohmann::json::parse(in)["models"][name];
  return f;
}

LlamaModel load_model(const Fixture& f, std::shared_ptr<AttentionBackend> backend = nullptr) {
  LlamaModel m(f.arch);
  hf_load_weights(*m, f.dir);
  m->set_attention_backend(backend ? backend : std::make_shared<DenseTestAttention>());
  return m;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Labels as the fixture makes them: the next token of the same sequence, -100 after the last.
at::Tensor shifted_labels(const at::Tensor& ids /*(B, S)*/) {
  at::Tensor labels = at::full_like(ids, -100);
  labels.narrow(1, 0, ids.size(1) - 1).copy_(ids.narrow(1, 1, ids.size(1) - 1));
  return labels;
}

at::Tensor batch_positions(int64_t B, int64_t S) { return at::arange(S, at::kLong).repeat({B}); }

// The fixture's schedule, as its expected.json writes the formula.
double fixture_lr(int64_t s, const nlohmann::json& h) {
  const double lr = h["lr"], min_lr = h["min_lr"];
  const int64_t warmup = h["warmup"], total = h["total_steps"];
  if (s < warmup) return lr * static_cast<double>(s + 1) / static_cast<double>(warmup);
  const double r = std::min(1.0, static_cast<double>(s - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup - 1)));
  return min_lr + 0.5 * (1.0 + std::cos(M_PI * r)) * (lr - min_lr);
}

TrainConfig fixture_train_config(const nlohmann::json& h) {
  TrainConfig t;
  t.lr = h["lr"];
  t.min_lr = h["min_lr"];
  t.warmup = h["warmup"];
  t.steps = h["total_steps"];
  t.schedule = h["schedule"];
  t.beta1 = h["betas"][0];
  t.beta2 = h["betas"][1];
  t.eps = h["eps"];
  t.weight_decay = h["weight_decay"];
  t.grad_clip = h["grad_clip"];
  return t;
}

}  // namespace

TEST_CASE("hf config.json of the fixtures reads into LlamaArch", "[llama][hf]") {
  LlamaArch u = hf_config_read(kFixtures + "/untied");
  CHECK(u.vocab_size == 1024);
  CHECK(u.hidden_size == 64);
  CHECK(u.intermediate_size == 96);
  CHECK(u.num_layers == 2);
  CHECK(u.num_heads == 4);
  CHECK(u.num_kv_heads == 2);
  CHECK(u.head_dim == 16);
  CHECK_FALSE(u.tie_embeddings);
  CHECK(u.rope_theta == 500000.0);
  CHECK(u.rope_scaling.type == "llama3");
  CHECK(u.rope_scaling.factor == 8.0);
  CHECK(u.rope_scaling.original_max_position_embeddings == 64);
  LlamaArch t = hf_config_read(kFixtures + "/tied/config.json");
  CHECK(t.tie_embeddings);
  CHECK(t.vocab_size == 1000);
  CHECK(t.rope_theta == 10000.0);
}

TEST_CASE("rope inverse frequencies match HF's llama3 scaling", "[llama][hf][rope]") {
  for (const char* name : {"tied", "untied"}) {
    Fixture f = load_fixture(name);
    at::Tensor ours = rope_inv_freq(f.arch);
    at::Tensor hf = f.expected.copy("inv_freq");
    INFO(name);
    CHECK(max_abs_diff(ours, hf) <= 1e-7 * hf.abs().max().item<double>());
    // The scaling must matter in this fixture, or the check above proves little.
    LlamaArch plain = f.arch;
    plain.rope_scaling.type = "none";
    CHECK(max_abs_diff(rope_inv_freq(plain), hf) > 1e-3);
  }
}

TEST_CASE("llama forward, loss and gradients match HF transformers", "[llama][hf]") {
  for (const char* name : {"tied", "untied"}) {
    // The test's own dense attention, and the project's backends by name.
    for (const std::string backend_name : {"dense-test", "reference", "torch"}) {
      Fixture f = load_fixture(name);
      INFO(name << ", attention " << backend_name);
      LlamaModel m = load_model(f, backend_name == "dense-test" ? nullptr : make_attention_backend(backend_name));
      at::Tensor ids = f.expected.copy("input_ids");  // (2, 48)
      const int64_t B = ids.size(0), S = ids.size(1);
      at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S));
      CHECK(max_abs_diff(hidden, f.expected.copy("hidden")) < 1e-4);

      {
        torch::NoGradGuard no_grad;
        at::Tensor logits = m->logits(hidden);
        at::Tensor rows = logits.index_select(0, f.expected.copy("logits_row_index"));
        CHECK(max_abs_diff(rows, f.expected.copy("logits_rows")) < 1e-4);
        CHECK(max_abs_diff(at::logsumexp(logits, {1}), f.expected.copy("logits_lse")) < 1e-4);
        CHECK(max_abs_diff(logits.sum(1), f.expected.copy("logits_sum")) < 1e-3);  // sum of V terms
      }

      LossOptions lo;
      lo.chunk_tokens = 7;  // several chunks and a ragged last one
      LossResult r = llama_loss(*m, hidden, f.expected.copy("labels").reshape({-1}), lo);
      CHECK(r.count == B * (S - 1) - 2);  // two more ignored labels inside the sequences
      at::Tensor loss = r.sum / static_cast<double>(r.count);
      const double hf_loss = f.expected.copy("loss").item<double>();
      CHECK(std::abs(loss.item<double>() - hf_loss) < 1e-4);
      CHECK(std::abs(loss.item<double>() - f.info["loss"].get<double>()) < 1e-4);

      loss.backward();
      auto params = m->named_parameters();
      for (const auto& n : f.expected.names()) {
        if (n.rfind("grad.", 0) == 0) {
          INFO(n);
          const std::string p = n.substr(5);
          CHECK(max_abs_diff(params[p].grad(), f.expected.copy(n)) < 1e-4);
        } else if (n.rfind("grad_rows.", 0) == 0) {
          INFO(n);
          const std::string p = n.substr(10);
          at::Tensor g = params[p].grad().index_select(0, f.expected.copy("grad_row_index"));
          CHECK(max_abs_diff(g, f.expected.copy(n)) < 1e-4);
        }
      }
      // The comparisons above must be sensitive: gradients are far from zero.
      CHECK(params["model.layers.0.self_attn.q_proj.weight"].grad().abs().max().item<double>() > 1e-3);
    }
  }
}

TEST_CASE("20 AdamW steps match HF transformers + torch.optim.AdamW", "[llama][hf][train]") {
  for (const char* name : {"tied", "untied"}) {
    SECTION(name) {
      Fixture f = load_fixture(name);
      const nlohmann::json& h = f.info["train"];
      LlamaModel m = load_model(f);
      std::vector<at::Tensor> decay, no_decay;
      for (const auto& p : m->named_parameters()) (p.value().dim() >= 2 ? decay : no_decay).push_back(p.value());
      auto opts = [&](double wd) {
        auto o = std::make_unique<torch::optim::AdamWOptions>(h["lr"].get<double>());
        o->betas({h["betas"][0].get<double>(), h["betas"][1].get<double>()}).eps(h["eps"].get<double>()).weight_decay(wd);
        return o;
      };
      std::vector<torch::optim::OptimizerParamGroup> groups;
      groups.emplace_back(decay, opts(h["weight_decay"].get<double>()));
      groups.emplace_back(no_decay, opts(0.0));
      torch::optim::AdamW opt(std::move(groups), *opts(0.0));

      at::Tensor train_ids = f.expected.copy("train_ids");  // (steps, B, S)
      at::Tensor want_loss = f.expected.copy("train_losses");
      at::Tensor want_norm = f.expected.copy("train_grad_norms");
      const int64_t steps = train_ids.size(0), B = train_ids.size(1), S = train_ids.size(2);
      const double clip = h["grad_clip"];
      double worst_loss = 0, worst_norm = 0;
      for (int64_t s = 0; s < steps; ++s) {
        const double lr = fixture_lr(s, h);
        CHECK(std::abs(lr - h["lrs"][s].get<double>()) < 1e-12);
        for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
        opt.zero_grad();
        at::Tensor ids = train_ids[s];
        at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S));
        LossResult r = llama_loss(*m, hidden, shifted_labels(ids).reshape({-1}));
        at::Tensor loss = r.sum / static_cast<double>(r.count);
        loss.backward();
        const double norm = torch::nn::utils::clip_grad_norm_(m->parameters(), clip);
        opt.step();
        worst_loss = std::max(worst_loss, std::abs(loss.item<double>() - want_loss[s].item<double>()));
        worst_norm = std::max(worst_norm, std::abs(norm - want_norm[s].item<double>()) / want_norm[s].item<double>());
      }
      INFO(name << ": worst loss diff " << worst_loss << ", worst relative grad-norm diff " << worst_norm);
      CHECK(worst_loss < 1e-4);
      CHECK(worst_norm < 1e-4);
      // The run must move the model, or matching losses would prove little about the optimizer.
      CHECK(std::abs(want_loss[steps - 1].item<double>() - want_loss[0].item<double>()) > 0.1);
    }
  }
}

TEST_CASE("20 steps with flexcp's FlatAdamW and lr schedule match HF transformers", "[llama][hf][train]") {
  for (const char* name : {"tied", "untied"}) {
    SECTION(name) {
      Fixture f = load_fixture(name);
      const nlohmann::json& h = f.info["train"];
      const TrainConfig t = fixture_train_config(h);
      LlamaModel m = load_model(f);
      std::vector<std::pair<std::string, at::Tensor>> named;
      for (const auto& p : m->named_parameters()) named.emplace_back(p.key(), p.value());
      AdamWHyper hyper;
      hyper.beta1 = t.beta1;
      hyper.beta2 = t.beta2;
      hyper.eps = t.eps;
      hyper.weight_decay = t.weight_decay;
      FlatAdamW opt(named, hyper);

      at::Tensor train_ids = f.expected.copy("train_ids");
      at::Tensor want_loss = f.expected.copy("train_losses");
      at::Tensor want_norm = f.expected.copy("train_grad_norms");
      const int64_t steps = train_ids.size(0), B = train_ids.size(1), S = train_ids.size(2);
      double worst_loss = 0, worst_norm = 0;
      for (int64_t s = 0; s < steps; ++s) {
        const double lr = lr_at(t, s);
        CHECK(std::abs(lr - h["lrs"][s].get<double>()) < 1e-12);  // the project's schedule is the fixture's
        opt.zero_grad();
        at::Tensor ids = train_ids[s];
        at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S));
        LossResult r = llama_loss(*m, hidden, shifted_labels(ids).reshape({-1}));
        at::Tensor loss = r.sum / static_cast<double>(r.count);
        loss.backward();
        opt.accumulate_grads();
        const double norm = opt.clip_grad_norm(t.grad_clip).item<double>();
        opt.step(lr);
        worst_loss = std::max(worst_loss, std::abs(loss.item<double>() - want_loss[s].item<double>()));
        worst_norm = std::max(worst_norm, std::abs(norm - want_norm[s].item<double>()) / want_norm[s].item<double>());
      }
      INFO(name << ": worst loss diff " << worst_loss << ", worst relative grad-norm diff " << worst_norm);
      CHECK(worst_loss < 1e-4);
      CHECK(worst_norm < 1e-4);
    }
  }
}

TEST_CASE("a bf16 model stays close to HF's fp32 loss and gradients", "[llama][bf16]") {
  Fixture f = load_fixture("untied");
  LlamaModel m = load_model(f);
  m->to(at::kBFloat16);
  at::Tensor ids = f.expected.copy("input_ids");
  const int64_t B = ids.size(0), S = ids.size(1);
  at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S));
  CHECK(hidden.scalar_type() == at::kBFloat16);
  LossResult r = llama_loss(*m, hidden, f.expected.copy("labels").reshape({-1}));
  CHECK(r.sum.scalar_type() == at::kFloat);
  at::Tensor loss = r.sum / static_cast<double>(r.count);
  CHECK(std::abs(loss.item<double>() - f.expected.copy("loss").item<double>()) < 0.05);
  loss.backward();
  auto params = m->named_parameters();
  for (const char* n : {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"}) {
    INFO(n);
    at::Tensor g = params[n].grad();
    REQUIRE(g.scalar_type() == at::kBFloat16);
    at::Tensor a = g.to(at::kDouble).reshape({-1}), b = f.expected.copy(std::string("grad.") + n).to(at::kDouble).reshape({-1});
    const double cosine = (a * b).sum().item<double>() / (a.norm().item<double>() * b.norm().item<double>());
    CHECK(cosine > 0.99);
  }
}

TEST_CASE("chunked cross-entropy equals the plain formula, values and gradients", "[llama][loss]") {
  at::manual_seed(7);
  const int64_t T = 37, H = 16, V = 101;
  at::Tensor hidden0 = at::randn({T, H}), weight0 = at::randn({V, H}) * 0.5;
  at::Tensor labels = at::randint(0, V, {T}, at::kLong);
  labels[3] = -100;
  labels[36] = -100;
  // Reference: full logits, log_softmax, sum over valid rows.
  at::Tensor h_ref = hidden0.clone().requires_grad_(true), w_ref = weight0.clone().requires_grad_(true);
  at::Tensor logp = at::log_softmax(at::matmul(h_ref, w_ref.t()), 1);
  at::Tensor valid = labels.ne(-100);
  at::Tensor ref = -(logp.gather(1, at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1)).squeeze(1) *
                     valid.to(at::kFloat)).sum();
  (ref * 0.37).backward();
  for (int64_t chunk : {1, 5, 36, 37, 1000, 0}) {
    INFO("chunk " << chunk);
    at::Tensor h = hidden0.clone().requires_grad_(true), w = weight0.clone().requires_grad_(true);
    LossOptions o;
    o.chunk_tokens = chunk;
    LossResult r = chunked_cross_entropy(h, w, labels, o);
    CHECK(r.count == T - 2);
    CHECK(std::abs(r.sum.item<double>() - ref.item<double>()) < 1e-4);
    (r.sum * 0.37).backward();
    CHECK(max_abs_diff(h.grad(), h_ref.grad()) < 1e-5);
    CHECK(max_abs_diff(w.grad(), w_ref.grad()) < 1e-5);
  }
  at::Tensor bad = labels.clone();
  bad[0] = V;
  CHECK_THROWS_AS(chunked_cross_entropy(hidden0, weight0, bad), UserError);
}

TEST_CASE("activation checkpointing gives the same loss and gradients", "[llama][checkpoint]") {
  Fixture f = load_fixture("untied");
  at::Tensor ids = f.expected.copy("input_ids");
  const int64_t B = ids.size(0), S = ids.size(1);
  std::map<std::string, at::Tensor> grads[2];
  double losses[2];
  for (int ckpt = 0; ckpt < 2; ++ckpt) {
    LlamaModel m = load_model(f);
    m->set_activation_checkpointing(ckpt == 1);
    at::Tensor hidden = m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S));
    LossResult r = llama_loss(*m, hidden, f.expected.copy("labels").reshape({-1}));
    at::Tensor loss = r.sum / static_cast<double>(r.count);
    loss.backward();
    losses[ckpt] = loss.item<double>();
    for (const auto& p : m->named_parameters()) {
      REQUIRE(p.value().grad().defined());
      grads[ckpt][p.key()] = p.value().grad().clone();
    }
  }
  CHECK(losses[0] == losses[1]);
  for (const auto& kv : grads[0]) {
    INFO(kv.first);
    CHECK(max_abs_diff(kv.second, grads[1][kv.first]) < 1e-6);
  }
}

TEST_CASE("fresh model: HF names, HF init, parameter count", "[llama]") {
  LlamaArch a;
  REQUIRE(llama_arch_preset("tiny", a));
  a.vocab_size = 512;  // keep the test light
  for (bool tied : {true, false}) {
    a.tie_embeddings = tied;
    at::manual_seed(3);
    LlamaModel m(a, 0.05);
    auto params = m->named_parameters();
    int64_t count = 0;
    for (const auto& p : params) count += p.value().numel();
    CHECK(count == llama_arch_num_params(a));
    CHECK(params.contains("model.embed_tokens.weight"));
    CHECK(params.contains("model.layers.3.self_attn.k_proj.weight"));
    CHECK(params.contains("model.layers.0.mlp.gate_proj.weight"));
    CHECK(params.contains("model.layers.0.input_layernorm.weight"));
    CHECK(params.contains("model.layers.0.post_attention_layernorm.weight"));
    CHECK(params.contains("model.norm.weight"));
    CHECK(params.contains("lm_head.weight") == !tied);
    CHECK(params["model.layers.1.self_attn.k_proj.weight"].sizes() == at::IntArrayRef({a.num_kv_heads * a.head_dim, a.hidden_size}));
    CHECK(at::equal(params["model.norm.weight"], at::ones({a.hidden_size})));
    const double sd = params["model.embed_tokens.weight"].std().item<double>();
    CHECK(std::abs(sd - 0.05) < 0.005);
    CHECK(std::abs(params["model.layers.0.mlp.down_proj.weight"].mean().item<double>()) < 0.005);
  }
  LlamaArch bad = a;
  bad.num_kv_heads = 3;
  CHECK_THROWS_AS(LlamaModel(bad), UserError);
}

TEST_CASE("a model saved as an HF folder reloads identically, tied and untied, sharded too", "[llama][hf]") {
  const std::string base = std::string("/tmp/flexcp_llama_save_") + std::to_string(::getpid());
  for (const char* name : {"tied", "untied"}) {
    Fixture f = load_fixture(name);
    LlamaModel m = load_model(f);
    const std::string dir = base + "/" + name;
    HfSaveOptions so;
    so.max_shard_bytes = 200000;  // forces shards
    hf_save_model(*m, dir, so);
    CHECK(std::filesystem::exists(dir + "/model.safetensors.index.json"));
    LlamaArch back = hf_config_read(dir);
    CHECK(back.tie_embeddings == f.arch.tie_embeddings);
    CHECK(back.rope_scaling.factor == f.arch.rope_scaling.factor);
    CHECK(back.rope_theta == f.arch.rope_theta);
    CHECK(back.num_kv_heads == f.arch.num_kv_heads);
    LlamaModel m2(back);
    hf_load_weights(*m2, dir);
    auto p1 = m->named_parameters(), p2 = m2->named_parameters();
    REQUIRE(p1.size() == p2.size());
    for (const auto& p : p1) CHECK(at::equal(p.value(), p2[p.key()]));
    SafetensorsSet files = SafetensorsSet::open(dir);
    CHECK(files.contains("lm_head.weight") == !f.arch.tie_embeddings);
  }
  std::filesystem::remove_all(base);
}

// Hidden: writes HF folders for test/fixtures/check_hf_export.py, which loads them in transformers
// (FLEXCP_HF_EXPORT_DIR=dir ./flexcp_tests "[.hf-export]").
TEST_CASE("export HF folders for transformers to load", "[.hf-export]") {
  const char* out = std::getenv("FLEXCP_HF_EXPORT_DIR");
  REQUIRE(out != nullptr);
  auto export_one = [&](const char* fixture, const std::string& folder, const HfSaveOptions& so) {
    Fixture f = load_fixture(fixture);
    LlamaModel m = load_model(f);
    const std::string dir = std::string(out) + "/" + folder;
    hf_save_model(*m, dir, so);
    torch::NoGradGuard no_grad;
    at::Tensor ids = f.expected.copy("input_ids");
    const int64_t B = ids.size(0), S = ids.size(1);
    at::Tensor logits = m->logits(m->forward_hidden(ids.reshape({-1}), batch_positions(B, S), spec_causal_batch(B, S)));
    safetensors_save(dir + "/flexcp_check.safetensors", {{"input_ids", ids}, {"logits", logits}});
  };
  export_one("tied", "tied", HfSaveOptions{});
  HfSaveOptions sharded;
  sharded.max_shard_bytes = 300000;
  export_one("untied", "untied_sharded", sharded);
  HfSaveOptions bf16;
  bf16.dtype = at::kBFloat16;
  export_one("untied", "untied_bf16", bf16);
}
