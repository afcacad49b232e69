#include "core/rendezvous.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "core/comm_heartbeat.h"
#include "core/comm_nccl.h"
#include "core/comm_watchdog.h"
#include "core/errors.h"
#ifdef FLEXCP_WITH_MPI
#include "core/comm_mpi.h"
#endif

namespace flexcp {

namespace {

int env_int(const std::function<const char*(const char*)>& get, const char* name, int fallback, bool required) {
  const char* v = get(name);
  if (v == nullptr || *v == '\0') {
    if (required) fail("environment", std::string(name) + " is not set", "the launcher sets it; start with mpirun, torchrun, srun or flexcp launch");
    return fallback;
  }
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || x < 0 || x > (1L << 30))
    fail("environment", std::string(name) + "=" + v + " is not a non-negative integer");
  return static_cast<int>(x);
}

std::string env_str(const std::function<const char*(const char*)>& get, const char* name, const std::string& fallback) {
  const char* v = get(name);
  return (v == nullptr || *v == '\0') ? fallback : std::string(v);
}

class TcpKvStore final : public KvStore {
 public:
  explicit TcpKvStore(c10::intrusive_ptr<c10d::TCPStore> s) : s_(std::move(s)) {}
  void set(const std::string& key, const std::vector<uint8_t>& value) override { s_->set(key, value); }
  std::vector<uint8_t> get(const std::string& key) override { return s_->get(key); }
  int64_t add(const std::string& key, int64_t delta) override { return s_->add(key, delta); }

 private:
  c10::intrusive_ptr<c10d::TCPStore> s_;
};

// The address other ranks reach this one at: loopback on one node, else the host name.
std::string reachable_host(const LaunchEnv& env) {
  if (env.local_world_size >= env.world_size) return "127.0.0.1";
  char name[256] = {0};
  ::gethostname(name, sizeof name - 1);
  return name;
}

#ifdef FLEXCP_WITH_MPI
// Under mpirun there is no store: rank 0 starts one on a free port, only for the heartbeat, and
// sends its address over MPI. Best effort: without it the watchdog still stops a hung run, it only
// cannot name the late rank.
std::shared_ptr<KvStore> mpi_heartbeat_store(const LaunchEnv& env) {
  std::array<char, 300> addr{};  // "host:port", empty when rank 0 could not start the store
  std::shared_ptr<KvStore> store;
  const std::string host = reachable_host(env);
  c10d::TCPStoreOptions o;
  o.waitWorkers = false;
  o.timeout = std::chrono::seconds(30);
  if (env.rank == 0) {
    try {
      o.port = 0;  // a free port
      o.isServer = true;
      auto s = c10::make_intrusive<c10d::TCPStore>(host, o);
      std::snprintf(addr.data(), addr.size(), "%s:%u", host.c_str(), static_cast<unsigned>(s->getPort()));
      store = std::make_shared<TcpKvStore>(s);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "flexcp: rank 0 could not start the heartbeat store (%s); a timed-out collective will not "
                           "name the late rank\n", std::string(e.what()).substr(0, std::string(e.what()).find('\n')).c_str());
    }
  }
  mpi_broadcast_world(addr.data(), static_cast<int64_t>(addr.size()), 0);
  const std::string a(addr.data());
  if (env.rank != 0 && !a.empty()) {
    try {
      o.port = static_cast<std::uint16_t>(std::stoi(a.substr(a.rfind(':') + 1)));
      o.isServer = false;
      store = std::make_shared<TcpKvStore>(c10::make_intrusive<c10d::TCPStore>(a.substr(0, a.rfind(':')), o));
    } catch (const std::exception&) {
      store = nullptr;  // this rank's line will say it cannot tell
    }
  }
  return store;
}
#endif

// Watchdog for a communicator of `kind`, or null without a timeout or with one rank.
std::shared_ptr<CommWatchdog> watchdog_for(const std::string& kind, const LaunchEnv& env, double timeout_s) {
  if (!(timeout_s > 0) || env.world_size < 2 || kind == "none") return nullptr;
  return std::make_shared<CommWatchdog>(CommWatchdog::Options{timeout_s, env.rank, env.world_size, kind});
}

// Publishes this rank's progress through `store` and lets the watchdog read everyone's.
void watchdog_attach_heartbeat(CommWatchdog& wd, std::shared_ptr<KvStore> store, const LaunchEnv& env) {
  if (!store) return;
  // Several beats per timeout, at most one per second per rank (a small write to rank 0's store).
  const double interval = std::clamp(wd.timeout_s() / 4, 0.05, 1.0);
  auto hb = std::make_shared<RankHeartbeat>(std::move(store), env.rank, env.world_size, interval, wd.started_counter());
  wd.set_late_ranks_probe([hb](uint64_t seq) { return hb->late_ranks(seq); });
  wd.set_stop_note([hb] { hb->mark_stopped(); });
  // Rank 0 serves the store: it waits after its own line so that the others can still read it.
  if (env.rank == 0) wd.set_linger(3 * interval + 1);
}

bool built_with_mpi() {
#ifdef FLEXCP_WITH_MPI
  return true;
#else
  return false;
#endif
}

}  // namespace

std::string slurm_first_host(const std::string& nodelist) {
  // The first entry ends at a comma outside brackets; a bracket holds ranges: take the first number.
  std::string first;
  int depth = 0;
  for (char c : nodelist) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    first += c;
  }
  const auto lb = first.find('[');
  if (lb == std::string::npos) return first;
  std::string inside = first.substr(lb + 1, first.find(']') - lb - 1);
  const auto cut = inside.find_first_of(",-");
  return first.substr(0, lb) + inside.substr(0, cut) + (first.find(']') + 1 < first.size() ? first.substr(first.find(']') + 1) : "");
}

LaunchEnv launch_env_from(const std::function<const char*(const char*)>& get) {
  LaunchEnv e;
  auto has = [&](const char* n) { return get(n) != nullptr && *get(n) != '\0'; };
  if (has("RANK") && has("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = env_int(get, "RANK", 0, true);
    e.world_size = env_int(get, "WORLD_SIZE", 1, true);
    e.local_rank = env_int(get, "LOCAL_RANK", e.rank, false);
    e.local_world_size = env_int(get, "LOCAL_WORLD_SIZE", e.world_size, false);
    e.master_addr = env_str(get, "MASTER_ADDR", "127.0.0.1");
    e.master_port = env_int(get, "MASTER_PORT", 29500, false);
  } else if (has("OMPI_COMM_WORLD_SIZE")) {
    e.launcher = "mpirun";
    e.rank = env_int(get, "OMPI_COMM_WORLD_RANK", 0, true);
    e.world_size = env_int(get, "OMPI_COMM_WORLD_SIZE", 1, true);
    e.local_rank = env_int(get, "OMPI_COMM_WORLD_LOCAL_RANK", 0, false);
    e.local_world_size = env_int(get, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, false);
    e.master_addr = env_str(get, "MASTER_ADDR", "127.0.0.1");
    e.master_port = env_int(get, "MASTER_PORT", 29500, false);
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS")) {
    e.launcher = "slurm";
    e.rank = env_int(get, "SLURM_PROCID", 0, true);
    e.world_size = env_int(get, "SLURM_NTASKS", 1, true);
    e.local_rank = env_int(get, "SLURM_LOCALID", 0, false);
    // SLURM_TASKS_PER_NODE looks like "4(x2)" or "4,3": the first number is this layout's width.
    e.local_world_size = std::max(1, std::atoi(env_str(get, "SLURM_TASKS_PER_NODE", "1").c_str()));
    const std::string nodes = env_str(get, "SLURM_JOB_NODELIST", env_str(get, "SLURM_NODELIST", "127.0.0.1"));
    e.master_addr = env_str(get, "MASTER_ADDR", slurm_first_host(nodes));
    e.master_port = env_int(get, "MASTER_PORT", 29500, false);
  }
  if (e.world_size < 1) fail("environment", "world size is 0", "check the launcher's WORLD_SIZE / -np");
  if (e.rank >= e.world_size)
    fail("environment", "rank " + std::to_string(e.rank) + " is not below the world size " + std::to_string(e.world_size));
  if (e.master_port < 1 || e.master_port > 65535)
    fail("environment", "MASTER_PORT=" + std::to_string(e.master_port) + " is not a TCP port", "use 1..65535");
  return e;
}

LaunchEnv launch_env_detect() {
  return launch_env_from([](const char* n) -> const char* { return std::getenv(n); });
}

std::string launch_env_describe(const LaunchEnv& e) {
  std::ostringstream os;
  os << e.launcher << ": rank " << e.rank << "/" << e.world_size << ", local rank " << e.local_rank << "/"
     << e.local_world_size;
  if (e.world_size > 1 && e.launcher != "mpirun") os << ", master " << e.master_addr << ":" << e.master_port;
  return os.str();
}

std::shared_ptr<KvStore> rendezvous_store(const LaunchEnv& env, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(env.master_port);
  o.isServer = env.rank == 0;
  o.numWorkers = static_cast<std::size_t>(env.world_size);
  o.waitWorkers = true;
  o.timeout = timeout;
  try {
    return std::make_shared<TcpKvStore>(c10::make_intrusive<c10d::TCPStore>(env.master_addr, o));
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    fail("rendezvous", "rank " + std::to_string(env.rank) + " could not " + (env.rank == 0 ? "serve" : "reach") +
                           " the store at " + env.master_addr + ":" + std::to_string(env.master_port) + " (" + what + ")",
         "check MASTER_ADDR / MASTER_PORT (a free port on rank 0's host) and that every rank was started");
  }
}

std::string communicator_resolve(const std::string& kind, bool cuda, const LaunchEnv& env) {
  if (kind != "auto") return kind;
  if (cuda) return "nccl";
  if (env.world_size == 1) return "none";
  if (env.launcher == "mpirun" && built_with_mpi()) return "mpi";
  return "tcp";
}

std::shared_ptr<Communicator> communicator_create(const std::string& kind, bool cuda, const LaunchEnv& env) {
  return communicator_create(kind, cuda, env, 0);
}

std::shared_ptr<Communicator> communicator_create(const std::string& kind_in, bool cuda, const LaunchEnv& env,
                                                  double timeout_s) {
  const std::string kind = communicator_resolve(kind_in, cuda, env);
  const std::string where = "parallel.communicator";
  if (kind == "none") {
    if (env.world_size != 1)
      fail(where, "'none' with " + std::to_string(env.world_size) + " ranks (" + env.launcher + ")",
           "use auto, mpi, tcp or nccl");
    return make_single_process_communicator();
  }
  if (kind == "nccl") {
    if (!cuda) fail(where, "nccl needs a GPU run", "set train.device: cuda, or use mpi / tcp on the CPU");
    if (!nccl_available())
      fail(where, "this flexcp was built without NCCL, which a GPU run needs",
           "rebuild on a machine with NCCL (nccl.h and libnccl) and CUDA LibTorch, or run on the CPU");
    std::shared_ptr<KvStore> store;
    const bool via_mpi = env.launcher == "mpirun" && built_with_mpi();
    if (env.world_size > 1 && !via_mpi) store = rendezvous_store(env);
#ifdef FLEXCP_WITH_NCCL
    auto wd = watchdog_for(kind, env, timeout_s);
    auto comm = make_nccl_communicator(env, store, wd);
    if (wd) {
#ifdef FLEXCP_WITH_MPI
      if (!store) store = mpi_heartbeat_store(env);
#endif
      watchdog_attach_heartbeat(*wd, store, env);
    }
    return comm;
#endif
  }
  if (kind == "mpi") {
#ifdef FLEXCP_WITH_MPI
    if (env.launcher != "mpirun" && env.launcher != "none")
      fail(where, "mpi under " + env.launcher, "start with mpirun, or use tcp");
    auto wd = watchdog_for(kind, env, timeout_s);
    auto comm = make_mpi_communicator(wd);
    if (wd) watchdog_attach_heartbeat(*wd, mpi_heartbeat_store(env), env);
    return comm;
#else
    fail(where, "this flexcp was built without MPI", "install libopenmpi-dev and rebuild, or use tcp");
#endif
  }
  if (kind == "tcp") {
    if (env.world_size == 1) return make_single_process_communicator();
    auto wd = watchdog_for(kind, env, timeout_s);
    auto store = rendezvous_store(env);
    auto comm = make_tcp_communicator(store, env, wd);
    if (wd) watchdog_attach_heartbeat(*wd, store, env);
    return comm;
  }
  fail(where, "unknown communicator '" + kind + "'", "use auto, mpi, tcp, nccl or none");
}

}  // namespace flexcp
