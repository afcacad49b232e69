// Launcher environments, rendezvous and the socket communicator inside one process (ranks as
// threads), the parallel config checks, and `flexcp launch` end to end.
#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <map>
#include <thread>

#include "core/comm_nccl.h"
#include "core/config.h"
#include "core/cp_run.h"
#include "core/errors.h"
#include "core/rendezvous.h"
#include "test/test_util.h"

using namespace flexcp;
using flexcp::test::free_tcp_port;
using flexcp::test::shell_run;

namespace {

LaunchEnv env_of(const std::map<std::string, std::string>& vars) {
  return launch_env_from([&](const char* n) -> const char* {
    auto it = vars.find(n);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t pos = s.find(what); pos != std::string::npos; pos = s.find(what, pos + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("rendezvous: launcher environments", "[cp][launch]") {
  LaunchEnv e = env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                        {"MASTER_ADDR", "10.0.0.5"}, {"MASTER_PORT", "1234"}});
  CHECK(e.launcher == "torchrun");
  CHECK(e.rank == 3);
  CHECK(e.world_size == 8);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 2);
  CHECK(e.master_addr == "10.0.0.5");
  CHECK(e.master_port == 1234);

  e = env_of({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
              {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
  CHECK(e.launcher == "mpirun");
  CHECK(e.rank == 1);
  CHECK(e.world_size == 4);

  e = env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"}, {"SLURM_TASKS_PER_NODE", "4(x4)"},
              {"SLURM_JOB_NODELIST", "gpu[07-10],login1"}});
  CHECK(e.launcher == "slurm");
  CHECK(e.rank == 5);
  CHECK(e.world_size == 16);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 4);
  CHECK(e.master_addr == "gpu07");
  CHECK(e.master_port == 29500);

  e = env_of({});
  CHECK(e.launcher == "none");
  CHECK(e.world_size == 1);

  CHECK_THROWS_WITH(env_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}), Catch::Contains("RANK=x"));
  CHECK_THROWS_AS(env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}}), UserError);
  CHECK_THROWS_AS(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}), UserError);

  CHECK(slurm_first_host("node1") == "node1");
  CHECK(slurm_first_host("node[3-5,9],gpu1") == "node3");
  CHECK(slurm_first_host("a[012,015]-ib") == "a012-ib");
  CHECK(slurm_first_host("x1,x2") == "x1");
}

TEST_CASE("rendezvous: communicator choice and its errors", "[cp][launch]") {
  LaunchEnv one;
  LaunchEnv two = env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}});
  CHECK(communicator_resolve("auto", false, one) == "none");
  CHECK(communicator_resolve("auto", false, two) == "tcp");
  CHECK(communicator_resolve("auto", true, two) == "nccl");
  CHECK(communicator_create("auto", false, one)->size() == 1);
  CHECK_THROWS_WITH(communicator_create("none", false, two), Catch::Contains("parallel.communicator"));
  CHECK_THROWS_WITH(communicator_create("mpi", false, two), Catch::Contains("mpi"));
  CHECK_THROWS_WITH(communicator_create("nccl", false, one), Catch::Contains("GPU"));
  CHECK_THROWS_WITH(communicator_create("carrier-pigeon", false, one), Catch::Contains("unknown communicator"));
  if (!nccl_available()) CHECK_THROWS_WITH(communicator_create("nccl", true, one), Catch::Contains("without NCCL"));
}

TEST_CASE("tcp communicator: ranks as threads meet through the TCPStore", "[cp][launch]") {
  const int n = 3, port = free_tcp_port();
  std::vector<std::string> errors(n);
  std::vector<std::thread> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.emplace_back([&, r] {
      try {
        LaunchEnv e;
        e.launcher = "torchrun";
        e.rank = r;
        e.world_size = n;
        e.local_rank = r;
        e.local_world_size = n;
        e.master_port = port;
        auto c = communicator_create("auto", false, e);
        if (c->backend() != "tcp" || c->rank() != r || c->size() != n) throw std::runtime_error("wrong identity");
        at::Tensor t = at::full({1000}, r + 1.0);
        c->all_reduce_sum(t);
        if (!at::equal(t, at::full({1000}, 6.0))) throw std::runtime_error("all_reduce_sum");
        std::vector<int64_t> sc{1, 2, 3}, rc(3, r + 1);
        std::vector<at::Tensor> parts;
        for (int p = 0; p < n; ++p) parts.push_back(at::full({sc[p], 4}, 10.0 * r + p));
        at::Tensor got = c->all_to_all_v(at::cat(parts), sc, rc);
        std::vector<at::Tensor> want;
        for (int p = 0; p < n; ++p) want.push_back(at::full({rc[p], 4}, 10.0 * p + r));
        if (!at::equal(got, at::cat(want))) throw std::runtime_error("all_to_all_v");
        auto sub = c->split(r == 1 ? 1 : 0, r);
        if (sub->size() != (r == 1 ? 1 : 2)) throw std::runtime_error("split");
        std::vector<uint8_t> b;
        if (r == 2) b = {1, 2, 3};
        c->broadcast_bytes(b, 2);
        if (b != std::vector<uint8_t>{1, 2, 3}) throw std::runtime_error("broadcast_bytes");
        c->barrier();
      } catch (const std::exception& ex) {
        errors[r] = ex.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < n; ++r) CHECK(errors[r] == "");
}

TEST_CASE("cp config checks fail before any work", "[cp][launch]") {
  RunConfig cfg;
  cfg.source = "configs/x.yaml";
  cfg.train.seq_len = 256;
  cfg.parallel.cp = 4;
  CHECK_NOTHROW(cp_config_check(cfg, 8, false));
  CHECK_THROWS_WITH(cp_config_check(cfg, 6, false), Catch::Contains("parallel.cp (4) does not divide the world size (6"));
  cfg.parallel.cp_chunk_size = 24;
  CHECK_THROWS_WITH(cp_config_check(cfg, 4, false), Catch::Contains("cp_chunk_size"));
  cfg.parallel.cp_chunk_size = 16;
  CHECK_NOTHROW(cp_config_check(cfg, 4, false));
  cfg.train.seq_len = 258;
  cfg.parallel.cp_chunk_size = 0;
  CHECK_THROWS_WITH(cp_config_check(cfg, 4, false), Catch::Contains("train.seq_len (258)"));
  cfg.train.seq_len = 256;
  cfg.parallel.communicator = "nccl";
  CHECK_THROWS_WITH(cp_config_check(cfg, 4, false), Catch::Contains("nccl needs CUDA"));
  if (!nccl_available()) {
    cfg.parallel.communicator = "auto";
    CHECK_THROWS_WITH(cp_config_check(cfg, 4, true), Catch::Contains("without NCCL"));
  }
  CHECK(cp_chunk_size_for(cfg) == 8);  // 256 / (8 * 4)
}

TEST_CASE("flexcp launch: ranks meet, and a failing rank fails the launch", "[cp][launch]") {
  auto [rc, out] = shell_run(std::string(FLEXCP_BINARY) + " launch --nproc-per-node 3 -- comm-check --mib 1 --tokens 192");
  INFO(out);
  CHECK(rc == 0);
  CHECK(count(out, "; OK") == 3);
  CHECK(count(out, "tcp on cpu") == 3);

  std::tie(rc, out) = shell_run(std::string(FLEXCP_BINARY) + " launch --nproc-per-node 2 -- comm-check --communicator none");
  INFO(out);
  CHECK(rc == 2);
  CHECK(out.find("'none' with 2 ranks") != std::string::npos);
}
