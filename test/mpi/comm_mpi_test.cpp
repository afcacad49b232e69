// The communicators (MPI and sockets) across real processes: every collective's result is checked
// against values each rank can compute on its own.
#include <ATen/ATen.h>

#include <catch2/catch.hpp>

#include "core/rendezvous.h"
#include "test/mpi/worlds.h"

using namespace flexcp;

TEST_CASE("communicators: all_reduce_sum, all_to_all_v, broadcast, split, barrier", "[mpi]") {
  for (const auto& world : flexcp_test::all_worlds()) {
    Communicator& c = *world;
    const int n = c.size(), r = c.rank();
    INFO("backend " << c.backend() << ", rank " << r << "/" << n);

    // all_reduce_sum, several dtypes; the large one crosses many socket writes.
    for (auto dt : {at::kFloat, at::kDouble, at::kLong, at::kBFloat16}) {
      at::Tensor t = at::full({7}, r + 1, at::TensorOptions().dtype(dt));
      c.all_reduce_sum(t);
      CHECK(at::equal(t, at::full({7}, n * (n + 1) / 2, at::TensorOptions().dtype(dt))));
    }
    at::Tensor big = at::arange(3'000'000, at::kFloat).remainder(1000).mul(r + 1);
    c.all_reduce_sum(big);
    CHECK(at::equal(big, at::arange(3'000'000, at::kFloat).remainder(1000).mul(n * (n + 1) / 2)));

    // all_to_all_v with uneven counts (zero included): rows from r to p carry the value 100 r + p.
    auto rows = [](int from, int to) { return static_cast<int64_t>((from + 2 * to + 1) % 3); };
    for (bool async : {false, true}) {
      std::vector<int64_t> sc(n), rc(n);
      std::vector<at::Tensor> parts;
      for (int p = 0; p < n; ++p) {
        sc[p] = rows(r, p);
        rc[p] = rows(p, r);
        parts.push_back(at::full({sc[p], 2, 3}, 100.0 * r + p));
      }
      at::Tensor send = at::cat(parts).contiguous();
      at::Tensor got = async ? c.all_to_all_v_async(send, sc, rc)->wait() : c.all_to_all_v(send, sc, rc);
      std::vector<at::Tensor> want;
      for (int p = 0; p < n; ++p) want.push_back(at::full({rc[p], 2, 3}, 100.0 * p + r));
      CHECK(at::equal(got, at::cat(want)));
    }

    // broadcast_bytes from the last rank; the others start with other sizes.
    const std::string msg = "hello from " + std::to_string(n - 1);
    std::vector<uint8_t> bytes(static_cast<size_t>(r + 3), 7);
    if (r == n - 1) bytes.assign(msg.begin(), msg.end());
    c.broadcast_bytes(bytes, n - 1);
    CHECK(std::string(bytes.begin(), bytes.end()) == msg);

    // split by parity, ranked by descending world rank.
    auto sub = c.split(r % 2, -r);
    int members = 0, before = 0, sum = 0;
    for (int p = 0; p < n; ++p)
      if (p % 2 == r % 2) {
        ++members;
        sum += p;
        if (p > r) ++before;
      }
    CHECK(sub->size() == members);
    CHECK(sub->rank() == before);
    at::Tensor s = at::full({1}, static_cast<double>(r), at::kDouble);
    sub->all_reduce_sum(s);
    CHECK(s.item<double>() == sum);
    sub->barrier();
    c.barrier();
  }
}

TEST_CASE("rendezvous: the launch environment of mpirun is recognized", "[mpi]") {
  const LaunchEnv e = launch_env_detect();
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  CHECK(e.launcher == "mpirun");
  CHECK(e.rank == rank);
  CHECK(e.world_size == size);
  CHECK(communicator_resolve("auto", false, e) == "mpi");
  CHECK(communicator_resolve("auto", true, e) == "nccl");
}
