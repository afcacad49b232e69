// The collective watchdog: a rank whose collective has waited longer than parallel.timeout_s for
// the other ranks prints ONE line (this rank, the collective, how long it waited and, when the
// heartbeat can tell, which rank is late or dead), runs the back-end's abort (MPI_Abort, so
// mpirun tears the whole job down; ncclCommAbort, so GPU kernels stuck on a dead peer are
// released) and ends the process with exit code 3 (kRankFailureExitCode).
//
// Why a thread: a rank blocked inside MPI_Allreduce, poll() or a CUDA synchronize cannot look at
// the clock itself, and MPI has no per-call timeout at all. The thread wakes a few times per
// timeout and only reads the table of collectives in flight: it never blocks on I/O, so it fires
// even when the store or the network is what hangs.
//
// Back-ends mark their collectives:
//   blocking (MPI, tcp)    auto s = comm_watch(wd, "all_reduce_sum");   ends when s goes
//   on a stream (NCCL)     wd->watch_async("all_reduce_sum", done);     `done` polled by the thread
// Each collective also counts one in collectives_started(), which the heartbeat (comm_heartbeat.h)
// publishes so that the other ranks can tell who did not arrive.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace flexcp {

class CommWatchdog {
 public:
  struct Options {
    double timeout_s = 600;  // > 0
    int rank = 0;            // world rank, for the message
    int world_size = 1;
    std::string backend;     // "mpi", "tcp", "nccl"
    double probe_limit_s = 10;  // how long the line waits for the late-ranks probe
  };
  explicit CommWatchdog(Options o);
  ~CommWatchdog();
  CommWatchdog(const CommWatchdog&) = delete;
  CommWatchdog& operator=(const CommWatchdog&) = delete;

  // A blocking collective in flight; ends (is no longer watched) when destroyed. Movable, so an
  // asynchronous transfer can carry its scope until wait().
  class Scope {
   public:
    Scope() = default;
    Scope(CommWatchdog* wd, uint64_t id) : wd_(wd), id_(id) {}
    Scope(Scope&& o) noexcept : wd_(o.wd_), id_(o.id_) { o.wd_ = nullptr; }
    Scope& operator=(Scope&& o) noexcept;
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() { end(); }
    void end();

   private:
    CommWatchdog* wd_ = nullptr;
    uint64_t id_ = 0;
  };
  Scope watch(const char* what);
  // A collective that completes later (enqueued on a CUDA stream): watched until done() is true.
  // done() runs on the watchdog thread; an exception from it counts as done.
  void watch_async(const char* what, std::function<bool()> done);

  // Set up by the back-end before the first collective.
  // Names the late or dead rank(s) for the collective numbered `seq` (may block: it runs on a side
  // thread and is given a few seconds).
  void set_late_ranks_probe(std::function<std::string(uint64_t seq)> probe);
  // Called before the process exits (MPI_Abort, ncclCommAbort). Errors are ignored.
  void add_abort(std::function<void()> abort);
  // Polled every tick: a non-empty answer is a fault to stop on now (NCCL's asynchronous errors).
  void add_error_probe(std::function<std::string()> probe);
  // Seconds to wait after printing and before aborting: the rank that serves the heartbeat store
  // lingers so that the other ranks can still read it for their own line.
  void set_linger(double seconds);
  // Run right after the line is printed (given 2 s): leaves a note that this rank stopped on its
  // own timeout, so that the ranks that see its connection close do not blame it (comm_heartbeat.h).
  void set_stop_note(std::function<void()> note);

  double timeout_s() const { return o_.timeout_s; }
  // Collectives this process has started (the number of the last one). Shared with the heartbeat.
  std::shared_ptr<const std::atomic<uint64_t>> started_counter() const { return started_; }

  // Tests: receive the line instead of printing, aborting and exiting (the watchdog then stops).
  void set_on_fire_for_test(std::function<void(const std::string&)> f);

 private:
  struct Op {
    std::string what;
    std::chrono::steady_clock::time_point start;
    std::function<bool()> done;  // empty: blocking, ended by its Scope
  };
  uint64_t begin(const char* what, std::function<bool()> done);
  void end(uint64_t id);
  void loop();
  void poll_loop();
  void fire(const std::string& reason, uint64_t seq);

  Options o_;
  std::chrono::milliseconds tick_;
  double linger_s_ = 0;
  std::shared_ptr<std::atomic<uint64_t>> started_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<uint64_t, Op> ops_;  // by collective number: begin() is the oldest in flight
  std::function<std::string(uint64_t)> late_probe_;
  std::vector<std::function<void()>> aborts_;
  std::vector<std::function<std::string()>> error_probes_;
  std::function<void()> stop_note_;
  std::function<void(const std::string&)> on_fire_for_test_;
  std::string async_error_;  // the first error an error probe reported (set by the polling thread)
  std::thread thread_;       // timing: fires on a timeout or an error; never blocks on the back-end
  std::thread poller_;       // polling: runs done() and the error probes, which may block
};

// True once a watchdog of this process has begun to stop it. A collective that fails meanwhile (a
// peer's connection closing because that peer stopped too) must not print a second line: it calls
// comm_watchdog_hold(), which parks the thread until the watchdog ends the process.
bool comm_watchdog_stopping();
[[noreturn]] void comm_watchdog_hold();

// wd may be null (no timeout): the scope then does nothing.
inline CommWatchdog::Scope comm_watch(const std::shared_ptr<CommWatchdog>& wd, const char* what) {
  return wd ? wd->watch(what) : CommWatchdog::Scope();
}

// "rank 1 of 4 (mpi): all_reduce_sum (collective #57) has waited 31.0 s for the other ranks, longer
// than parallel.timeout_s = 30: <late>; stopping this rank (exit code 3)". Exposed for tests.
std::string comm_watchdog_line(const CommWatchdog::Options& o, const std::string& what, uint64_t seq, double waited_s,
                               const std::string& late);

}  // namespace flexcp
