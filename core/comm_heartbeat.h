// Which rank is late? Every rank publishes, once per interval from a side thread, two counters to
// the rendezvous key-value store (rank 0 serves it):
//   flexcp/hb/<rank>/seq    collectives this rank has started (CommWatchdog::started_counter)
//   flexcp/hb/<rank>/beat   +1 per interval while the process lives
// Every rank makes the same collectives in the same order, so when a collective of this rank times
// out, the ranks whose count is below its number have not reached it; a beat that no longer moves
// means that process is dead or frozen, a moving one that it is alive but stuck outside
// communication (a hang in compute or I/O, a debugger).
//
// Why this side channel: it costs nothing on the collective path (one atomic increment; the store
// sees at most two small writes per rank per interval), it needs nothing from the communicator that
// is blocked, and it works for every back-end: tcp and NCCL under torchrun reuse the rendezvous
// store, MPI (and NCCL under mpirun) get one that rank 0 starts for the purpose (rendezvous.h).
// Counters use the store's add(), which never waits for a missing key.
//
// A rank whose own watchdog fired also sets flexcp/hb/<rank>/stopped, so that the ranks that then
// see its connection close (tcp) or its heartbeat stop say so instead of calling it dead. (A tcp rank
// that stops because a peer's connection closed tells the others itself: comm_tcp.cpp's goodbye.)
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace flexcp {

class KvStore;

class RankHeartbeat {
 public:
  RankHeartbeat(std::shared_ptr<KvStore> store, int rank, int world_size, double interval_s,
                std::shared_ptr<const std::atomic<uint64_t>> started);
  ~RankHeartbeat();
  RankHeartbeat(const RankHeartbeat&) = delete;
  RankHeartbeat& operator=(const RankHeartbeat&) = delete;

  // A clause naming the ranks that have not reached collective number `seq`, the furthest behind
  // first, and whether each is alive. Blocks for about 2.5 intervals (it watches the beats move).
  std::string late_ranks(uint64_t seq);

  // Marks this rank as stopped by its own watchdog (blocking store write).
  void mark_stopped();

  double interval_s() const { return interval_s_; }

 private:
  void loop();

  std::shared_ptr<KvStore> store_;
  int rank_, world_size_;
  double interval_s_;
  std::shared_ptr<const std::atomic<uint64_t>> started_;
  std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::string store_error_;  // set when the store stopped answering (rank 0 gone)
  std::thread thread_;
};

// Whether `rank` noted that its own watchdog stopped it (false when the store cannot tell).
bool heartbeat_rank_stopped(KvStore& store, int rank);

struct RankProgress {
  int rank = 0;
  uint64_t started = 0;  // collectives started
  bool alive = true;     // its beat moved while we watched
  bool stopped = false;  // its own watchdog stopped it (it timed out waiting for someone else)
};
// The clause late_ranks() prints, from what it read (exposed for tests).
std::string late_ranks_describe(const std::vector<RankProgress>& ranks, int me, uint64_t seq);

}  // namespace flexcp
