// FlatAdamW against LibTorch's own AdamW (param groups: decay on matrices only) and the schedule.
#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/optim/adamw.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "core/lr_schedule.h"
#include "core/optimizer.h"

using namespace flexcp;

namespace {
struct Net : torch::nn::Module {
  Net() {
    a = register_module("a", torch::nn::Linear(6, 5));
    b = register_module("b", torch::nn::Linear(5, 3));
    norm = register_parameter("norm", at::ones({3}));
  }
  at::Tensor forward(const at::Tensor& x) { return b(at::tanh(a(x))) * norm; }
  torch::nn::Linear a{nullptr}, b{nullptr};
  at::Tensor norm;
};
}  // namespace

TEST_CASE("FlatAdamW matches torch::optim::AdamW with clipping", "[optimizer]") {
  at::manual_seed(3);
  auto n1 = std::make_shared<Net>(), n2 = std::make_shared<Net>();
  {
    at::NoGradGuard g;
    auto p1 = n1->parameters(), p2 = n2->parameters();
    for (size_t i = 0; i < p1.size(); ++i) p2[i].copy_(p1[i]);
  }
  const double wd = 0.1, lr = 0.05, clip = 0.5;
  FlatAdamW flat(n1->named_parameters().pairs(), {0.9, 0.95, 1e-8, wd});
  std::vector<at::Tensor> decay, no_decay;
  for (auto& p : n2->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(1e-8).weight_decay(wd)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.0)));
  torch::optim::AdamW ref(groups);
  for (int step = 0; step < 12; ++step) {
    auto x = at::randn({7, 6}), y = at::randn({7, 3});
    flat.zero_grad();
    for (int micro = 0; micro < 2; ++micro) {  // gradient accumulation lands in the flat buffer
      (n1->forward(x.narrow(0, micro * 3, 3 + micro)) - y.narrow(0, micro * 3, 3 + micro)).pow(2).sum().backward();
      flat.accumulate_grads();
    }
    const double norm = flat.clip_grad_norm(clip).item<double>();
    flat.step(lr);
    ref.zero_grad();
    for (int micro = 0; micro < 2; ++micro)
      (n2->forward(x.narrow(0, micro * 3, 3 + micro)) - y.narrow(0, micro * 3, 3 + micro)).pow(2).sum().backward();
    double ref_norm = 0;
    for (auto& p : n2->parameters()) ref_norm += p.grad().pow(2).sum().item<double>();
    ref_norm = std::sqrt(ref_norm);
    CHECK(norm == Approx(ref_norm).epsilon(1e-5));
    const double coef = std::min(1.0, clip / (ref_norm + 1e-6));
    for (auto& p : n2->parameters()) p.grad().mul_(coef);
    ref.step();
  }
  auto p1 = n1->parameters(), p2 = n2->parameters();
  for (size_t i = 0; i < p1.size(); ++i) CHECK(at::allclose(p1[i], p2[i], 1e-5, 1e-6));
  CHECK(flat.steps_taken() == 12);
}

TEST_CASE("FlatAdamW state round-trips through state_tensors", "[optimizer]") {
  auto net = std::make_shared<Net>();
  FlatAdamW a(net->named_parameters().pairs(), {});
  net->forward(at::randn({2, 6})).sum().backward();
  a.accumulate_grads();
  a.step(0.01);
  auto saved = a.state_tensors();
  std::map<std::string, at::Tensor> copy;
  for (auto& [k, v] : saved) copy[k] = v.clone();
  auto net2 = std::make_shared<Net>();
  FlatAdamW b(net2->named_parameters().pairs(), {});
  b.load_state(copy, a.steps_taken());
  for (auto& [k, v] : b.state_tensors()) CHECK(at::equal(v, saved.at(k)));
  CHECK(at::equal(net2->parameters()[0], net->parameters()[0]));
}

TEST_CASE("learning-rate schedule: warm-up then cosine, linear or constant", "[optimizer]") {
  TrainConfig t;
  t.steps = 100;
  t.warmup = 10;
  t.lr = 1.0;
  t.min_lr = 0.1;
  CHECK(lr_at(t, 0) == Approx(0.1));
  CHECK(lr_at(t, 9) == Approx(1.0));
  CHECK(lr_at(t, 10) == Approx(1.0));
  CHECK(lr_at(t, 99) == Approx(0.1));
  CHECK(lr_at(t, 10 + 89 / 2.0) == Approx(0.55).margin(0.02));
  t.schedule = "linear";
  CHECK(lr_at(t, 99) == Approx(0.1));
  t.schedule = "constant";
  CHECK(lr_at(t, 50) == Approx(1.0));
}
