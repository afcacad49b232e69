// Who am I, and how do the ranks find each other. Three launchers are understood:
//   mpirun    OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
//   torchrun  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//             (also what `flexcp launch` sets)
//   slurm     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST
//             (MASTER_ADDR / MASTER_PORT when set, else the first node and port 29500)
// Ranks without MPI meet through a key-value store that rank 0 hosts: LibTorch's c10d TCPStore.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/comm.h"

namespace flexcp {

class CommWatchdog;

struct LaunchEnv {
  std::string launcher = "none";  // none | mpirun | torchrun | slurm
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// Reads the launcher's variables through `get` (getenv by default). Throws UserError naming the
// variable when one is malformed or the set is inconsistent.
LaunchEnv launch_env_detect();
LaunchEnv launch_env_from(const std::function<const char*(const char*)>& get);
std::string launch_env_describe(const LaunchEnv& env);

// First host of a Slurm node list: "node[03-05,9],gpu1" -> "node03".
std::string slurm_first_host(const std::string& nodelist);

// A key-value store shared by all ranks (c10d::TCPStore; rank 0 serves it at master_addr:master_port).
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual void set(const std::string& key, const std::vector<uint8_t>& value) = 0;
  virtual std::vector<uint8_t> get(const std::string& key) = 0;  // waits until the key exists
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
};
std::shared_ptr<KvStore> rendezvous_store(const LaunchEnv& env,
                                          std::chrono::milliseconds timeout = std::chrono::minutes(10));

// Socket communicator (comm_tcp.cpp): full mesh of TCP connections set up through the store.
std::shared_ptr<Communicator> make_tcp_communicator(std::shared_ptr<KvStore> store, const LaunchEnv& env,
                                                   std::shared_ptr<CommWatchdog> wd = nullptr);

// kind: auto | mpi | tcp | nccl | none. `cuda` says the run is on GPUs (auto then means NCCL).
// Throws UserError, before any collective, when the kind cannot work here: NCCL missing from this
// build for a GPU run, MPI asked for without mpirun or without MPI in the build, several ranks with
// "none", and so on.
std::shared_ptr<Communicator> communicator_create(const std::string& kind, bool cuda, const LaunchEnv& env);
// The same, with a collective timeout (parallel.timeout_s; 0 = none): every collective of the
// communicator and of those split from it is watched (comm_watchdog.h), and the ranks publish a
// heartbeat (comm_heartbeat.h) through the rendezvous store (under mpirun, one that rank 0 starts)
// so that a timed-out rank can name the rank that is late or dead.
std::shared_ptr<Communicator> communicator_create(const std::string& kind, bool cuda, const LaunchEnv& env,
                                                  double timeout_s);
// The kind `auto` resolves to (for messages and --dry-run).
std::string communicator_resolve(const std::string& kind, bool cuda, const LaunchEnv& env);

}  // namespace flexcp
