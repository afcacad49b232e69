// The collective watchdog, the heartbeat that names late ranks, and the start-up consistency
// helpers, on one process (the multi-process runs are test/mpi/dead_rank_test.sh and
// test/mpi/run_consistency_mpi_test.cpp).
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include "core/comm_heartbeat.h"
#include "core/comm_watchdog.h"
#include "core/config.h"
#include "core/rendezvous.h"
#include "core/run_consistency.h"

using namespace flexcp;
using namespace std::chrono_literals;

namespace {

// The store the ranks share, in memory.
class MemoryStore final : public KvStore {
 public:
  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    std::lock_guard<std::mutex> lk(m_);
    bytes_[key] = value;
  }
  std::vector<uint8_t> get(const std::string& key) override {
    std::lock_guard<std::mutex> lk(m_);
    return bytes_.at(key);
  }
  int64_t add(const std::string& key, int64_t delta) override {
    std::lock_guard<std::mutex> lk(m_);
    if (broken_) throw std::runtime_error("Connection reset by peer");
    return counters_[key] += delta;
  }
  void set_broken() {
    std::lock_guard<std::mutex> lk(m_);
    broken_ = true;
  }

 private:
  std::mutex m_;
  std::map<std::string, std::vector<uint8_t>> bytes_;
  std::map<std::string, int64_t> counters_;
  bool broken_ = false;
};

// Fires (into `line`) or not within `wait`.
struct Fired {
  std::mutex m;
  std::string line;
  bool fired() {
    std::lock_guard<std::mutex> lk(m);
    return !line.empty();
  }
};

std::shared_ptr<CommWatchdog> test_watchdog(double timeout_s, Fired& f) {
  auto wd = std::make_shared<CommWatchdog>(CommWatchdog::Options{timeout_s, 1, 4, "tcp", 0.5});
  wd->set_on_fire_for_test([&f](const std::string& line) {
    std::lock_guard<std::mutex> lk(f.m);
    f.line = line;
  });
  return wd;
}

bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return cond();
}

}  // namespace

TEST_CASE("watchdog: a collective past the timeout gives one line naming rank, collective, wait and late rank",
          "[comm][watchdog]") {
  Fired f;
  auto wd = test_watchdog(0.2, f);
  wd->set_late_ranks_probe([](uint64_t seq) { return "rank 2 has not reached #" + std::to_string(seq); });
  { auto quick = comm_watch(wd, "barrier"); }  // #1, done at once
  auto s = comm_watch(wd, "all_reduce_sum");   // #2, never ends
  REQUIRE(wait_until([&] { return f.fired(); }, 3000ms));
  INFO(f.line);
  CHECK(f.line.find("rank 1 of 4 (tcp): all_reduce_sum (collective #2) has waited ") != std::string::npos);
  CHECK(f.line.find("longer than parallel.timeout_s = 0.2: rank 2 has not reached #2; stopping this rank (exit code 3)") !=
        std::string::npos);
  CHECK(f.line.find('\n') == std::string::npos);
  CHECK(wd->started_counter()->load() == 2);
}

TEST_CASE("watchdog: collectives that end in time, and finished async ones, never fire", "[comm][watchdog]") {
  Fired f;
  auto wd = test_watchdog(0.3, f);
  for (int i = 0; i < 10; ++i) {
    auto s = comm_watch(wd, "all_reduce_sum");
    std::this_thread::sleep_for(20ms);
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  wd->watch_async("all_to_all_v", [done] { return done->load(); });
  std::this_thread::sleep_for(100ms);
  *done = true;
  std::this_thread::sleep_for(500ms);
  CHECK_FALSE(f.fired());
  CHECK(wd->started_counter()->load() == 11);
  auto none = comm_watch(nullptr, "no watchdog");  // a null watchdog is a no-op scope
}

TEST_CASE("watchdog: an async collective that never completes fires, an error probe fires at once", "[comm][watchdog]") {
  Fired f;
  auto wd = test_watchdog(0.2, f);
  wd->watch_async("all_to_all_v", [] { return false; });
  REQUIRE(wait_until([&] { return f.fired(); }, 3000ms));
  CHECK(f.line.find("all_to_all_v (collective #1) has waited") != std::string::npos);
  CHECK(f.line.find("cannot tell which rank is late (no heartbeat store)") != std::string::npos);

  Fired g;
  auto wd2 = test_watchdog(100, g);
  auto s = comm_watch(wd2, "all_reduce_sum");
  wd2->add_error_probe([] { return std::string("NCCL reported an asynchronous error (remote process exited)"); });
  REQUIRE(wait_until([&] { return g.fired(); }, 5000ms));
  INFO(g.line);
  CHECK(g.line.find("rank 1 of 4 (tcp): NCCL reported an asynchronous error (remote process exited) during "
                    "all_reduce_sum (collective #1): cannot tell which rank is late (no heartbeat store); stopping this "
                    "rank (exit code 3)") != std::string::npos);
}

TEST_CASE("watchdog: a done() poll that blocks (a stuck CUDA driver) still fires on time", "[comm][watchdog]") {
  // On the H100, rank 0's cudaEventQuery blocked while its main thread waited behind a hung peer's
  // NCCL kernel, and a watchdog that polled on its timing thread never printed its line.
  Fired f;
  auto wd = test_watchdog(0.2, f);
  auto stuck = std::make_shared<std::atomic<bool>>(true);
  wd->watch_async("all_to_all_v", [stuck] {
    while (*stuck) std::this_thread::sleep_for(10ms);
    return true;
  });
  const bool fired = wait_until([&] { return f.fired(); }, 3000ms);
  *stuck = false;  // lets the polling thread end before the watchdog is destroyed
  REQUIRE(fired);
  CHECK(f.line.find("all_to_all_v (collective #1) has waited") != std::string::npos);
}

TEST_CASE("watchdog: a probe that blocks does not hold the line back", "[comm][watchdog]") {
  Fired f;
  auto wd = test_watchdog(0.1, f);
  auto stuck = std::make_shared<std::atomic<bool>>(true);
  wd->set_late_ranks_probe([stuck](uint64_t) {
    while (*stuck) std::this_thread::sleep_for(10ms);
    return std::string("never");
  });
  auto s = comm_watch(wd, "broadcast_bytes");
  REQUIRE(wait_until([&] { return f.fired(); }, 5000ms));
  CHECK(f.line.find("the heartbeat store did not answer within 0.5 s") != std::string::npos);
  *stuck = false;
}

TEST_CASE("late_ranks_describe names the furthest-behind rank and whether it lives", "[comm][watchdog]") {
  std::vector<RankProgress> r = {{0, 40, true}, {1, 45, true}, {2, 31, true}, {3, 44, false}};
  CHECK(late_ranks_describe(r, 1, 45) ==
        "rank 2 has not reached it (its last count: 31 collectives started; this one is #45) and is alive: it is stuck outside "
        "communication (compute, I/O, a debugger); also behind: rank 0 (40), rank 3 (44, no heartbeat)");
  r[2].alive = false;
  CHECK(late_ranks_describe(r, 1, 45).find("rank 2 has not reached it (its last count: 31 collectives started; this one is #45) and its "
                                           "heartbeat stopped: it died or froze") == 0);
  // A rank that stopped on its own timeout was waiting for another one: it goes last.
  r = {{0, 45, true}, {1, 30, false, true}, {2, 31, true}};
  CHECK(late_ranks_describe(r, 0, 45).find("rank 2 has not reached it") == 0);
  CHECK(late_ranks_describe(r, 0, 45).find("rank 1 (30, stopped on its own timeout)") != std::string::npos);
  r = {{0, 45, true}, {1, 45, true}};
  CHECK(late_ranks_describe(r, 0, 45) == "every rank has reached this collective and is alive (a network, MPI or NCCL fault?)");
  r[1].alive = false;
  CHECK(late_ranks_describe(r, 0, 45).find("the heartbeat of rank 1 stopped") != std::string::npos);
}

TEST_CASE("heartbeat: ranks publish progress, a rank that stops beating is called dead", "[comm][watchdog]") {
  auto store = std::make_shared<MemoryStore>();
  auto c0 = std::make_shared<std::atomic<uint64_t>>(12), c1 = std::make_shared<std::atomic<uint64_t>>(9),
       c2 = std::make_shared<std::atomic<uint64_t>>(12);
  auto h0 = std::make_unique<RankHeartbeat>(store, 0, 4, 0.05, c0);
  auto h1 = std::make_unique<RankHeartbeat>(store, 1, 4, 0.05, c1);
  auto h2 = std::make_unique<RankHeartbeat>(store, 2, 4, 0.05, c2);
  // rank 3 never started: no key at all
  std::this_thread::sleep_for(200ms);
  std::string s = h0->late_ranks(12);
  INFO(s);
  CHECK(s.find("rank 3 has not reached it (its last count: 0 collectives started; this one is #12) and its heartbeat stopped") == 0);
  CHECK(s.find("also behind: rank 1 (9)") != std::string::npos);
  h2->mark_stopped();
  CHECK(heartbeat_rank_stopped(*store, 2));
  CHECK_FALSE(heartbeat_rank_stopped(*store, 1));
  c1->store(12);
  std::this_thread::sleep_for(200ms);
  s = h0->late_ranks(12);
  CHECK(s.find("rank 3 has not reached it") == 0);
  CHECK(s.find("rank 1") == std::string::npos);
  // The store's host goes away: the line says so instead of guessing.
  store->set_broken();
  std::this_thread::sleep_for(200ms);
  CHECK(h1->late_ranks(12).find("the heartbeat store on rank 0 stopped answering") != std::string::npos);
  CHECK_FALSE(heartbeat_rank_stopped(*store, 2));
}

TEST_CASE("consistency: canonical config text and its first difference", "[comm][consistency]") {
  RunConfig a = config_from_string("data: {synthetic: true}\n", "a.yaml");
  RunConfig b = config_from_string("data: {synthetic: true}\ntrain: {lr: 0.001}\nlogging: {quiet: true, every: 7}\n", "b.yaml");
  const std::string ta = config_canonical_text(a), tb = config_canonical_text(b);
  CHECK(ta.find("train.lr: 0.0003\n") != std::string::npos);
  CHECK(ta.find("model.rope_scaling.factor: ") != std::string::npos);
  CHECK(ta.find("logging.quiet") == std::string::npos);  // console-only fields may differ
  CHECK(config_first_difference(tb, ta) == "train.lr: 0.001 vs 0.0003");
  b.train.lr = a.train.lr;
  CHECK(config_canonical_text(b) == ta);  // quiet / every left out
  CHECK(config_first_difference(config_canonical_text(b), ta).empty());
  b.parallel.timeout_s = 5;
  CHECK(config_first_difference(config_canonical_text(b), ta) == "parallel.timeout_s: 5.0 vs 600.0");
  const RankFingerprint f = run_fingerprint(a, FLEXCP_BINARY);
  CHECK(f.binary.size() == 64);
  CHECK(f.manifest == "-");
  CHECK(run_fingerprint(a, "/nonexistent/flexcp").binary.empty());
}
