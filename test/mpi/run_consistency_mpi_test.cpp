// The start-up consistency check over real communicators (MPI and tcp): identical ranks pass; a rank
// with a different config, binary or data set makes EVERY rank throw the same one-line UserError
// naming the ranks and what differs (the first differing config key); the communicator stays usable.
#include <mpi.h>

#include <catch2/catch.hpp>

#include "core/config.h"
#include "core/errors.h"
#include "core/run_consistency.h"
#include "test/mpi/worlds.h"

using namespace flexcp;

namespace {

// Every rank's message (rank 0's is compared with the others' through the communicator).
std::string check_message(const RunConfig& cfg, Communicator& comm, const RankFingerprint& f) {
  try {
    run_consistency_check(cfg, comm, at::kCPU, f);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

bool same_on_every_rank(Communicator& comm, const std::string& s) {
  std::vector<uint8_t> root(s.begin(), s.end());
  comm.broadcast_bytes(root, 0);
  int diff = std::string(root.begin(), root.end()) != s, any = 0;
  MPI_Allreduce(&diff, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any == 0;
}

}  // namespace

TEST_CASE("consistency check: ranks with different configs, binaries or data all stop with one line", "[mpi][consistency]") {
  for (const auto& world : flexcp_test::all_worlds()) {
    INFO("communicator " << world->backend());
    const int n = world->size(), me = world->rank();
    RunConfig cfg = config_from_string("data: {synthetic: true}\n", "run.yaml");
    const RankFingerprint base = run_fingerprint(cfg, FLEXCP_BINARY);

    // Identical ranks (and a console-only difference) pass.
    RunConfig quiet = cfg;
    quiet.logging.quiet = me % 2 == 1;
    CHECK(check_message(quiet, *world, run_fingerprint(quiet, FLEXCP_BINARY)).empty());

    // The last rank's learning rate differs.
    RunConfig other = cfg;
    if (me == n - 1) other.train.lr = 0.001;
    std::string msg = check_message(other, *world, run_fingerprint(other, FLEXCP_BINARY));
    INFO(msg);
    const std::string last = std::to_string(n - 1);
    CHECK(msg.find("startup check: all ranks must run the same flexcp binary, config and data, but rank " + last +
                   "'s config differs from rank 0's (rank " + last + " vs rank 0: train.lr: 0.001 vs 0.0003)") == 0);
    CHECK(msg.find("; start every rank with the same command line") != std::string::npos);
    CHECK(same_on_every_rank(*world, msg));

    // Every odd rank runs another binary, rank 1 also reads other data.
    RankFingerprint f = base;
    if (me % 2 == 1) f.binary = std::string(64, 'e');
    if (me == 1) f.manifest = std::string(64, 'a');
    msg = check_message(cfg, *world, f);
    INFO(msg);
    const std::string odd = n == 2 ? "rank 1 runs" : "ranks 1, 3 run";
    CHECK(msg.find(odd + " a different flexcp binary than rank 0 (sha256 eeeeeeeeeeee vs " + base.binary.substr(0, 12) + ")") !=
          std::string::npos);
    CHECK(msg.find("rank 1's data set differs from rank 0's (manifest.json: aaaaaaaaaaaa vs synthetic data)") !=
          std::string::npos);
    CHECK(msg.find("config differs") == std::string::npos);
    CHECK(same_on_every_rank(*world, msg));

    // The communicator is still in step after the failures.
    at::Tensor t = at::ones({3});
    world->all_reduce_sum(t);
    CHECK(t[0].item<float>() == n);
  }
}
