#include "core/comm_watchdog.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "core/errors.h"

namespace flexcp {

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stopping{false};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, s < 10 ? "%.1f" : "%.0f", s);
  return buf;
}

// Runs fn() on a detached thread and waits at most `limit` for its answer (nullopt-like: `late`
// when it does not come): fn talks to the store, which may itself be what hangs, and the line must
// be printed regardless.
std::string call_with_deadline(std::function<std::string()> fn, std::chrono::milliseconds limit, const std::string& late) {
  struct Box {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::string text;
  };
  auto box = std::make_shared<Box>();
  std::thread([box, fn = std::move(fn)] {
    std::string t;
    try {
      t = fn();
    } catch (const std::exception& e) {
      std::string what = e.what();
      t = "cannot tell which rank is late (heartbeat store: " + what.substr(0, what.find('\n')) + ")";
    }
    std::lock_guard<std::mutex> lk(box->m);
    box->text = t;
    box->done = true;
    box->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lk(box->m);
  if (!box->cv.wait_for(lk, limit, [&] { return box->done; })) return late;
  return box->text;
}

std::string probe_with_deadline(const std::function<std::string(uint64_t)>& probe, uint64_t seq,
                                std::chrono::milliseconds limit) {
  if (!probe) return "cannot tell which rank is late (no heartbeat store)";
  return call_with_deadline([probe, seq] { return probe(seq); }, limit,
                            "cannot tell which rank is late (the heartbeat store did not answer within " +
                                format_seconds(limit.count() / 1000.0) + " s)");
}

}  // namespace

bool comm_watchdog_stopping() { return g_stopping.load(); }

void comm_watchdog_hold() {
  while (true) std::this_thread::sleep_for(std::chrono::hours(1));
}

std::string comm_watchdog_line(const CommWatchdog::Options& o, const std::string& what, uint64_t seq, double waited_s,
                               const std::string& late) {
  std::ostringstream os;
  os << "flexcp: rank " << o.rank << " of " << o.world_size << " (" << o.backend << "): " << what << " (collective #"
     << seq << ") has waited " << format_seconds(waited_s) << " s for the other ranks, longer than parallel.timeout_s = "
     << format_seconds(o.timeout_s) << ": " << late << "; stopping this rank (exit code " << kRankFailureExitCode << ")";
  return os.str();
}

CommWatchdog::Scope& CommWatchdog::Scope::operator=(Scope&& o) noexcept {
  if (this != &o) {
    end();
    wd_ = o.wd_;
    id_ = o.id_;
    o.wd_ = nullptr;
  }
  return *this;
}

void CommWatchdog::Scope::end() {
  if (wd_ != nullptr) wd_->end(id_);
  wd_ = nullptr;
}

CommWatchdog::CommWatchdog(Options o) : o_(std::move(o)) {
  // A few looks per timeout, at most one per second: a late line by a tenth of the timeout is fine.
  const double tick_s = std::clamp(o_.timeout_s / 10, 0.02, 1.0);
  tick_ = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(tick_s * 1000)));
  thread_ = std::thread([this] { loop(); });
  poller_ = std::thread([this] { poll_loop(); });
}

CommWatchdog::~CommWatchdog() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (poller_.joinable()) poller_.join();
}

CommWatchdog::Scope CommWatchdog::watch(const char* what) { return Scope(this, begin(what, {})); }

void CommWatchdog::watch_async(const char* what, std::function<bool()> done) { begin(what, std::move(done)); }

uint64_t CommWatchdog::begin(const char* what, std::function<bool()> done) {
  std::lock_guard<std::mutex> lk(m_);
  const uint64_t id = started_->fetch_add(1) + 1;
  ops_.emplace(id, Op{what, Clock::now(), std::move(done)});
  return id;
}

void CommWatchdog::end(uint64_t id) {
  std::lock_guard<std::mutex> lk(m_);
  ops_.erase(id);
}

void CommWatchdog::set_late_ranks_probe(std::function<std::string(uint64_t)> probe) {
  std::lock_guard<std::mutex> lk(m_);
  late_probe_ = std::move(probe);
}

void CommWatchdog::add_abort(std::function<void()> abort) {
  std::lock_guard<std::mutex> lk(m_);
  aborts_.push_back(std::move(abort));
}

void CommWatchdog::add_error_probe(std::function<std::string()> probe) {
  std::lock_guard<std::mutex> lk(m_);
  error_probes_.push_back(std::move(probe));
}

void CommWatchdog::set_linger(double seconds) {
  std::lock_guard<std::mutex> lk(m_);
  linger_s_ = seconds;
}

void CommWatchdog::set_stop_note(std::function<void()> note) {
  std::lock_guard<std::mutex> lk(m_);
  stop_note_ = std::move(note);
}

void CommWatchdog::set_on_fire_for_test(std::function<void(const std::string&)> f) {
  std::lock_guard<std::mutex> lk(m_);
  on_fire_for_test_ = std::move(f);
}

// The timing thread: reads the table, never calls into CUDA, NCCL or the network, so that it fires
// even when those are what is stuck.
void CommWatchdog::loop() {
  std::unique_lock<std::mutex> lk(m_);
  while (!stop_) {
    cv_.wait_for(lk, tick_);
    if (stop_) return;
    const uint64_t oldest = ops_.empty() ? 0 : ops_.begin()->first;
    const std::string what = ops_.empty() ? std::string("communication") : ops_.begin()->second.what;
    if (!async_error_.empty()) {
      const std::string err = async_error_;
      lk.unlock();
      fire("flexcp: rank " + std::to_string(o_.rank) + " of " + std::to_string(o_.world_size) + " (" + o_.backend +
               "): " + err + " during " + what + (oldest ? " (collective #" + std::to_string(oldest) + "): %LATE%" : "") +
               "; stopping this rank (exit code " + std::to_string(kRankFailureExitCode) + ")",
           oldest);
      return;
    }
    if (oldest == 0) continue;
    const double waited = seconds_since(ops_.begin()->second.start);
    if (waited <= o_.timeout_s) continue;
    lk.unlock();
    fire(comm_watchdog_line(o_, what, oldest, waited, "%LATE%"), oldest);
    return;
  }
}

// The polling thread: asks the back-end whether asynchronous collectives are done and whether it
// saw an error. Those calls (cudaEventQuery, ncclCommGetAsyncError) can block for as long as the
// CUDA driver does, e.g. while the main thread waits for room to launch behind a stuck NCCL kernel;
// they run here, without the lock, so that a blocked poll only leaves its collective unfinished,
// which the timing thread then reports.
void CommWatchdog::poll_loop() {
  while (true) {
    std::vector<std::pair<uint64_t, std::function<bool()>>> pending;
    std::vector<std::function<std::string()>> probes;
    std::vector<Op> released;  // ops that ended: destroyed (their CUDA events with them) after the lock
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait_for(lk, tick_);
      if (stop_) return;
      for (const auto& [id, op] : ops_)
        if (op.done) pending.emplace_back(id, op.done);
      probes = error_probes_;
    }
    std::vector<uint64_t> finished;
    for (const auto& [id, done] : pending) {
      bool is_done = false;
      try {
        is_done = done();
      } catch (...) {
        is_done = true;  // the stream is broken: the error probe or the next call reports it
      }
      if (is_done) finished.push_back(id);
    }
    std::string err;
    for (const auto& probe : probes) {
      try {
        err = probe();
      } catch (const std::exception& e) {
        err = e.what();
      }
      if (!err.empty()) break;
    }
    std::lock_guard<std::mutex> lk(m_);
    for (uint64_t id : finished) {
      if (auto it = ops_.find(id); it != ops_.end()) {
        released.push_back(std::move(it->second));
        ops_.erase(it);
      }
    }
    if (!err.empty() && async_error_.empty()) {
      async_error_ = err;
      cv_.notify_all();
    }
  }
}

// Runs on the watchdog thread once; ends the process (except under a test's on_fire hook).
void CommWatchdog::fire(const std::string& line_template, uint64_t seq) {
  std::function<std::string(uint64_t)> probe;
  std::vector<std::function<void()>> aborts;
  std::function<void(const std::string&)> test_hook;
  std::function<void()> note;
  double linger_s = 0;
  {
    std::lock_guard<std::mutex> lk(m_);
    linger_s = linger_s_;
    probe = late_probe_;
    aborts = aborts_;
    test_hook = on_fire_for_test_;
    note = stop_note_;
  }
  if (!test_hook) g_stopping = true;
  // Whatever happens below (a probe or an abort that blocks), the process ends.
  const double grace_s = o_.probe_limit_s + linger_s + 10;
  if (!test_hook)
    std::thread([grace_s] {
      std::this_thread::sleep_for(std::chrono::duration<double>(grace_s));
      std::_Exit(kRankFailureExitCode);
    }).detach();
  const auto probe_limit = std::chrono::milliseconds(static_cast<int64_t>(o_.probe_limit_s * 1000));
  std::string line = line_template;
  const auto mark = line.find("%LATE%");
  if (mark != std::string::npos) line.replace(mark, 6, probe_with_deadline(probe, seq, probe_limit));
  if (test_hook) {
    test_hook(line);
    return;
  }
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  if (note) call_with_deadline([note] { note(); return std::string(); }, std::chrono::seconds(2), "");
  if (linger_s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(linger_s));
  for (const auto& a : aborts) {
    try {
      a();
    } catch (...) {
    }
  }
  // _Exit, not exit: atexit handlers (MPI_Finalize) would wait for the ranks that are gone.
  std::_Exit(kRankFailureExitCode);
}

}  // namespace flexcp
