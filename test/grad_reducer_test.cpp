// The overlapped gradient all-reduce (core/grad_reducer.h) on one process, against a communicator
// that records what it is asked to sum: the bucket partition, the fixed launch order when gradients
// become final out of order, finish() for parameters without a gradient, and real backward passes
// (fp32 and bf16, one and two micro-batches) giving the gradient of accumulate_grads() + the
// whole-buffer all-reduce bit for bit.
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <set>

#include "core/comm.h"
#include "core/errors.h"
#include "core/grad_reducer.h"
#include "core/optimizer.h"

using namespace flexcp;

namespace {

// A "world" of two identical ranks: the sum doubles every element. Records each call's range of the
// gradient buffer (offset, numel) and whether its work was waited for.
class RecordingComm final : public Communicator {
 public:
  explicit RecordingComm(const at::Tensor& grad_buffer) : base_(grad_buffer.data_ptr<float>()) {}
  std::string backend() const override { return "recording"; }
  int rank() const override { return 0; }
  int size() const override { return 2; }
  int local_rank() const override { return 0; }
  void all_reduce_sum(at::Tensor& t) override { t.mul_(2); }
  std::unique_ptr<CommWork> all_reduce_sum_async(at::Tensor& t) override {
    calls.push_back({t.data_ptr<float>() - base_, t.numel()});
    waited.push_back(false);
    all_reduce_sum(t);
    return std::make_unique<Work>(this, waited.size() - 1, t);
  }
  at::Tensor all_to_all_v(const at::Tensor&, const std::vector<int64_t>&, const std::vector<int64_t>&) override {
    throw std::logic_error("not used");
  }
  void broadcast_bytes(std::vector<uint8_t>&, int) override { throw std::logic_error("not used"); }
  void barrier() override {}
  std::shared_ptr<Communicator> split(int, int) override { throw std::logic_error("not used"); }

  std::vector<std::pair<int64_t, int64_t>> calls;
  std::vector<bool> waited;

 private:
  class Work final : public CommWork {
   public:
    Work(RecordingComm* c, size_t i, at::Tensor t) : c_(c), i_(i), t_(std::move(t)) {}
    at::Tensor wait() override {
      c_->waited[i_] = true;
      return t_;
    }

   private:
    RecordingComm* c_;
    size_t i_;
    at::Tensor t_;
  };
  const float* base_;
};

std::vector<std::pair<std::string, at::Tensor>> named(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes,
                                                      at::ScalarType dtype = at::kFloat) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [name, shape] : shapes) out.push_back({name, at::randn(shape, at::kFloat).to(dtype).requires_grad_(true)});
  return out;
}

std::pair<int64_t, int64_t> range_of(const GradBucket& b) { return {b.offset, b.numel}; }

// A small model: a few matrices, a norm weight (no decay) and an unused matrix.
struct Net : torch::nn::Module {
  // Flat layout (own parameters before submodules'): unused, emb, a.weight, b.weight | norm, a.bias,
  // b.bias. The unused matrix is the last decayed bucket in launch order, so the biases and norm
  // after it wait for finish().
  Net() {
    unused = register_parameter("unused", at::randn({3, 3}));
    emb = register_parameter("emb", at::randn({12, 6}));
    norm = register_parameter("norm", at::ones({4}));
    a = register_module("a", torch::nn::Linear(6, 5));
    b = register_module("b", torch::nn::Linear(5, 4));
  }
  at::Tensor forward(const at::Tensor& ids) {
    at::Tensor x = emb.index_select(0, ids);
    return (b(at::tanh(a(x))) * norm).pow(2).sum();
  }
  at::Tensor emb, unused, norm;
  torch::nn::Linear a{nullptr}, b{nullptr};
};

}  // namespace

TEST_CASE("grad buckets: whole parameters, contiguous, last layers first, norm weights last", "[grad_reducer]") {
  at::manual_seed(1);
  // Model order emb, a, b, c, d (decayed, offsets 0, 80, 112, 144, 304), then norm1, norm2 (312, 320).
  const auto params = named({{"emb", {10, 8}}, {"a", {4, 8}}, {"b", {8, 4}}, {"norm1", {8}}, {"c", {20, 8}},
                             {"d", {2, 4}}, {"norm2", {8}}});
  FlatAdamW opt(params, AdamWHyper{});
  const auto buckets = grad_buckets_plan(opt.params(), 64 * sizeof(float));
  // By hand: d alone (c would pass 64), c alone (160 > 64), b + a (exactly 64), emb, then the norms.
  REQUIRE(buckets.size() == 5);
  CHECK(range_of(buckets[0]) == std::make_pair<int64_t, int64_t>(304, 8));
  CHECK(range_of(buckets[1]) == std::make_pair<int64_t, int64_t>(144, 160));
  CHECK(range_of(buckets[2]) == std::make_pair<int64_t, int64_t>(80, 64));
  CHECK(range_of(buckets[3]) == std::make_pair<int64_t, int64_t>(0, 80));
  CHECK(range_of(buckets[4]) == std::make_pair<int64_t, int64_t>(312, 16));

  // Properties on a larger random layout, for several bucket sizes.
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (int i = 0; i < 40; ++i) {
    const int64_t r = 1 + (i * 37) % 23, c = 1 + (i * 11) % 17;
    shapes.push_back({"p" + std::to_string(i), i % 5 == 4 ? std::vector<int64_t>{r} : std::vector<int64_t>{r, c}});
  }
  FlatAdamW big(named(shapes), AdamWHyper{});
  const auto& ps = big.params();
  for (int64_t cap_floats : {1, 50, 200, 1000, 100000}) {
    INFO("bucket of " << cap_floats << " floats");
    const int64_t cap = cap_floats * 4;
    const auto bs = grad_buckets_plan(ps, cap);
    std::set<size_t> seen;
    bool in_no_decay = false;
    int64_t prev_offset = -1;
    for (size_t k = 0; k < bs.size(); ++k) {
      const GradBucket& b = bs[k];
      REQUIRE(!b.params.empty());
      // Whole parameters, adjacent, walked from the highest offset down.
      int64_t end = b.offset + b.numel;
      for (size_t p : b.params) {
        CHECK(seen.insert(p).second);
        CHECK(ps[p].offset + ps[p].param.numel() == end);
        end = ps[p].offset;
        CHECK(ps[p].decay == ps[b.params.front()].decay);
      }
      CHECK(end == b.offset);
      // Decayed buckets first, each region from its end down.
      const bool decay = ps[b.params.front()].decay;
      if (!decay && !in_no_decay) {
        in_no_decay = true;
        prev_offset = -1;
      }
      CHECK(decay != in_no_decay);
      if (prev_offset >= 0) CHECK(b.offset + b.numel == prev_offset);
      prev_offset = b.offset;
      // At most the cap unless one parameter alone; and no room for the next parameter of the region.
      if (b.params.size() > 1) CHECK(b.numel * 4 <= cap);
      if (k + 1 < bs.size() && ps[bs[k + 1].params.front()].decay == decay)
        CHECK((b.numel + ps[bs[k + 1].params.front()].param.numel()) * 4 > cap);
    }
    CHECK(seen.size() == ps.size());
  }
}

TEST_CASE("grad reducer: buckets go out in the fixed order whatever order gradients become final", "[grad_reducer]") {
  at::manual_seed(2);
  const auto params = named({{"emb", {10, 8}}, {"a", {4, 8}}, {"b", {8, 4}}, {"norm1", {8}}, {"c", {20, 8}},
                             {"d", {2, 4}}, {"norm2", {8}}});
  FlatAdamW opt(params, AdamWHyper{});
  opt.zero_grad();
  at::Tensor grads = opt.grad_flat();
  grads.copy_(at::randn({grads.numel()}));
  const at::Tensor before = grads.clone();
  auto comm = std::make_shared<RecordingComm>(grads);
  GradReducer reducer(opt, comm, 64 * sizeof(float));
  auto index = [&](const std::string& name) {
    for (size_t i = 0; i < opt.params().size(); ++i)
      if (opt.params()[i].name == name) return i;
    FAIL("no parameter " << name);
    return size_t(0);
  };
  using Calls = std::vector<std::pair<int64_t, int64_t>>;
  // Buckets (launch order): d [304, 8], c [144, 160], b + a [80, 64], emb [0, 80], norms [312, 16].
  reducer.arm();
  reducer.param_ready(index("emb"));  // complete, but three buckets come before it
  CHECK(comm->calls.empty());
  reducer.param_ready(index("a"));
  CHECK(comm->calls.empty());
  reducer.param_ready(index("d"));
  CHECK(comm->calls == Calls{{304, 8}});
  reducer.param_ready(index("norm2"));  // its bucket waits for norm1, and for all before it
  reducer.param_ready(index("c"));
  CHECK(comm->calls == Calls{{304, 8}, {144, 160}});
  reducer.param_ready(index("b"));  // completes b + a, which lets emb go too
  CHECK(comm->calls == Calls{{304, 8}, {144, 160}, {80, 64}, {0, 80}});
  CHECK(comm->waited == std::vector<bool>(4, false));
  CHECK_THROWS_AS(reducer.param_ready(index("b")), std::logic_error);  // twice in one backward
  // norm1 never got a gradient: finish() sends its bucket as it is, then waits for every one.
  reducer.finish();
  CHECK(comm->calls == Calls{{304, 8}, {144, 160}, {80, 64}, {0, 80}, {312, 16}});
  CHECK(comm->waited == std::vector<bool>(5, true));
  CHECK(reducer.launched_in_backward() == 4);
  CHECK(at::equal(opt.grad_flat(), before * 2));
  // Outside an armed backward the hooks do nothing.
  reducer.param_ready(index("d"));
  CHECK(comm->calls.size() == 5);
  CHECK_THROWS_AS(reducer.finish(), std::logic_error);
}

TEST_CASE("grad reducer: real backward passes give accumulate_grads + whole-buffer all-reduce bit for bit", "[grad_reducer]") {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const int micro_batches : {1, 2}) {
      INFO((dtype == at::kFloat ? "fp32" : "bf16") << ", " << micro_batches << " micro-batches");
      at::manual_seed(5);
      auto ref_net = std::make_shared<Net>(), net = std::make_shared<Net>();
      {
        at::NoGradGuard g;
        auto p1 = ref_net->parameters(), p2 = net->parameters();
        for (size_t i = 0; i < p1.size(); ++i) p2[i].copy_(p1[i]);
      }
      ref_net->to(dtype);
      net->to(dtype);
      FlatAdamW ref_opt(ref_net->named_parameters().pairs(), AdamWHyper{});
      FlatAdamW opt(net->named_parameters().pairs(), AdamWHyper{});
      auto comm = std::make_shared<RecordingComm>(opt.grad_flat());
      auto ref_comm = std::make_shared<RecordingComm>(ref_opt.grad_flat());
      // 24 floats: b.weight, a.weight, emb, unused, then the 1-d ones together.
      GradReducer reducer(opt, comm, 24 * sizeof(float));
      REQUIRE(reducer.buckets().size() == 5);
      for (int step = 0; step < 2; ++step) {
        comm->calls.clear();
        ref_opt.zero_grad();
        opt.zero_grad();
        for (int m = 0; m < micro_batches; ++m) {
          const at::Tensor ids = at::randint(12, {7}, at::kLong);
          ref_net->forward(ids).backward();
          ref_opt.accumulate_grads();
          const bool last = m + 1 == micro_batches;
          if (last) reducer.arm();
          net->forward(ids).backward();
          if (!last) {
            CHECK(comm->calls.empty());  // not armed: the hooks did nothing
            opt.accumulate_grads();
          }
        }
        // The unused matrix's bucket and the one after it are left for finish().
        const size_t in_backward = comm->calls.size();
        reducer.finish();
        CHECK(reducer.launched_in_backward() == in_backward);
        CHECK(in_backward == 3);
        CHECK(comm->calls.size() == reducer.buckets().size());
        ref_comm->all_reduce_sum(ref_opt.grad_flat());
        CHECK(at::equal(opt.grad_flat(), ref_opt.grad_flat()));
        CHECK(opt.grad_flat().abs().sum().item<double>() > 0);
        ref_opt.step(0.01);
        opt.step(0.01);
        CHECK(at::equal(opt.master_flat(), ref_opt.master_flat()));
      }
    }
  }
}

TEST_CASE("grad reducer: one rank has none", "[grad_reducer]") {
  auto net = std::make_shared<Net>();
  FlatAdamW opt(net->named_parameters().pairs(), AdamWHyper{});
  CHECK(grad_reducer_for_run(opt, make_single_process_communicator(), at::kCPU) == nullptr);
}

namespace {

// Two ranks that agree on everything, under a back-end name of choice, with or without split.
class NamedComm final : public Communicator {
 public:
  NamedComm(std::string backend, bool splits) : backend_(std::move(backend)), splits_(splits) {}
  std::string backend() const override { return backend_; }
  bool can_split() const override { return splits_; }
  int rank() const override { return 0; }
  int size() const override { return 2; }
  int local_rank() const override { return 0; }
  void all_reduce_sum(at::Tensor& t) override { t.mul_(2); }
  at::Tensor all_to_all_v(const at::Tensor&, const std::vector<int64_t>&, const std::vector<int64_t>&) override {
    throw std::logic_error("not used");
  }
  void broadcast_bytes(std::vector<uint8_t>&, int) override {}  // rank 0's bytes are ours
  void barrier() override {}
  std::shared_ptr<Communicator> split(int, int) override {
    if (!splits_) throw std::logic_error("split on a communicator that cannot");
    return std::make_shared<NamedComm>(backend_, splits_);
  }

 private:
  std::string backend_;
  bool splits_;
};

// Whether the trainer gets a reducer on `backend` with FLEXCP_GRAD_OVERLAP set to `env` (nullptr: unset).
bool reducer_made(const std::string& backend, bool splits, const char* env) {
  if (env) setenv("FLEXCP_GRAD_OVERLAP", env, 1);
  else unsetenv("FLEXCP_GRAD_OVERLAP");
  auto net = std::make_shared<Net>();
  FlatAdamW opt(net->named_parameters().pairs(), AdamWHyper{});
  struct Unset {
    ~Unset() { unsetenv("FLEXCP_GRAD_OVERLAP"); }
  } unset;
  return grad_reducer_for_run(opt, std::make_shared<NamedComm>(backend, splits), at::kCPU) != nullptr;
}

}  // namespace

TEST_CASE("grad reducer: on by default on NCCL, opt-in elsewhere, refused where NCCL cannot split", "[grad_reducer]") {
  CHECK(reducer_made("nccl", true, nullptr));
  CHECK_FALSE(reducer_made("nccl", true, "0"));
  CHECK_FALSE(reducer_made("mpi", true, nullptr));
  CHECK(reducer_made("mpi", true, "1"));
  CHECK_FALSE(reducer_made("tcp", true, nullptr));
  // NCCL older than 2.18: off by default, and asking for it is a one-line error with the fix.
  CHECK_FALSE(reducer_made("nccl", false, nullptr));
  try {
    reducer_made("nccl", false, "1");
    FAIL("FLEXCP_GRAD_OVERLAP=1 without split was accepted");
  } catch (const UserError& e) {
    CHECK(std::string(e.what()).find("FLEXCP_GRAD_OVERLAP") != std::string::npos);
    CHECK(std::string(e.what()).find("NCCL 2.18 or newer") != std::string::npos);
  }
}
