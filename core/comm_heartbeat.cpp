#include "core/comm_heartbeat.h"

#include <algorithm>
#include <chrono>
#include <sstream>

#include "core/rendezvous.h"

namespace flexcp {

namespace {

std::string seq_key(int r) { return "flexcp/hb/" + std::to_string(r) + "/seq"; }
std::string beat_key(int r) { return "flexcp/hb/" + std::to_string(r) + "/beat"; }
std::string stopped_key(int r) { return "flexcp/hb/" + std::to_string(r) + "/stopped"; }

std::string first_line(const std::exception& e) {
  std::string s = e.what();
  return s.substr(0, s.find('\n'));
}

}  // namespace

RankHeartbeat::RankHeartbeat(std::shared_ptr<KvStore> store, int rank, int world_size, double interval_s,
                             std::shared_ptr<const std::atomic<uint64_t>> started)
    : store_(std::move(store)), rank_(rank), world_size_(world_size), interval_s_(interval_s), started_(std::move(started)) {
  thread_ = std::thread([this] { loop(); });
}

RankHeartbeat::~RankHeartbeat() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void RankHeartbeat::loop() {
  uint64_t published = 0;
  const auto interval = std::chrono::duration<double>(interval_s_);
  std::unique_lock<std::mutex> lk(m_);
  while (!stop_) {
    lk.unlock();
    try {
      const uint64_t now = started_->load();
      if (now != published) store_->add(seq_key(rank_), static_cast<int64_t>(now - published));
      published = now;
      store_->add(beat_key(rank_), 1);
    } catch (const std::exception& e) {
      // The store is gone (rank 0 exited, at the end of a run or in a failure): stop publishing.
      lk.lock();
      store_error_ = first_line(e);
      return;
    }
    lk.lock();
    cv_.wait_for(lk, interval, [this] { return stop_; });
  }
}

void RankHeartbeat::mark_stopped() { store_->add(stopped_key(rank_), 1); }

bool heartbeat_rank_stopped(KvStore& store, int rank) {
  try {
    return store.add(stopped_key(rank), 0) > 0;
  } catch (const std::exception&) {
    return false;
  }
}

std::string RankHeartbeat::late_ranks(uint64_t seq) {
  {
    std::lock_guard<std::mutex> lk(m_);
    if (!store_error_.empty())
      return "cannot tell which rank is late: the heartbeat store on rank 0 stopped answering (" + store_error_ +
             "), so rank 0 may be the one that died";
  }
  std::vector<RankProgress> ranks(static_cast<size_t>(world_size_));
  std::vector<int64_t> beats(ranks.size());
  for (int r = 0; r < world_size_; ++r) {
    ranks[r].rank = r;
    ranks[r].started = static_cast<uint64_t>(store_->add(seq_key(r), 0));
    beats[r] = store_->add(beat_key(r), 0);
  }
  // Long enough for every live rank to beat at least twice.
  std::this_thread::sleep_for(std::chrono::duration<double>(2.5 * interval_s_));
  for (int r = 0; r < world_size_; ++r) {
    ranks[r].alive = r == rank_ || store_->add(beat_key(r), 0) != beats[r];
    ranks[r].stopped = r != rank_ && store_->add(stopped_key(r), 0) > 0;
  }
  return late_ranks_describe(ranks, rank_, seq);
}

std::string late_ranks_describe(const std::vector<RankProgress>& ranks, int me, uint64_t seq) {
  std::vector<RankProgress> behind;
  for (const auto& r : ranks)
    if (r.rank != me && r.started < seq) behind.push_back(r);
  // The furthest behind first; a rank that stopped on its own timeout was waiting for someone else.
  std::stable_sort(behind.begin(), behind.end(), [](const auto& a, const auto& b) {
    return a.stopped != b.stopped ? b.stopped : a.started < b.started;
  });
  std::ostringstream os;
  if (behind.empty()) {
    std::vector<int> dead;
    for (const auto& r : ranks)
      if (!r.alive) dead.push_back(r.rank);
    if (dead.empty()) return "every rank has reached this collective and is alive (a network, MPI or NCCL fault?)";
    os << "every rank has reached this collective, but the heartbeat of rank " << dead[0]
       << " stopped: it died or froze inside it";
    return os.str();
  }
  const RankProgress& first = behind[0];
  os << "rank " << first.rank << " has not reached it (its last count: " << first.started
     << " collectives started; this one is #" << seq << ")"
     << (first.stopped  ? " and stopped on its own timeout"
         : first.alive ? " and is alive: it is stuck outside communication (compute, I/O, a debugger)"
                       : " and its heartbeat stopped: it died or froze");
  if (behind.size() > 1) {
    os << "; also behind:";
    const size_t shown = std::min<size_t>(behind.size(), 5);
    for (size_t i = 1; i < shown; ++i)
      os << (i > 1 ? "," : "") << " rank " << behind[i].rank << " (" << behind[i].started
         << (behind[i].stopped ? ", stopped on its own timeout" : behind[i].alive ? "" : ", no heartbeat") << ")";
    if (behind.size() > shown) os << " and " << behind.size() - shown << " more";
  }
  return os.str();
}

}  // namespace flexcp
