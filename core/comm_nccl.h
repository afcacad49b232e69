// The NCCL back-end (defined in comm_nccl.cpp, built only with NCCL and CUDA LibTorch:
// FLEXCP_WITH_NCCL). Tensors are CUDA tensors on this rank's device (local rank).
#pragma once
#include <memory>

#include "core/comm.h"

namespace flexcp {

struct LaunchEnv;
class KvStore;
class CommWatchdog;

// True when this build has the NCCL communicator.
inline bool nccl_available() {
#ifdef FLEXCP_WITH_NCCL
  return true;
#else
  return false;
#endif
}

// Rank 0 makes the NCCL unique id and shares it over MPI (under mpirun, store == nullptr) or through
// the store (torchrun, Slurm, flexcp launch). One rank needs neither. With a watchdog, every
// collective is watched until the GPU is past it, and a timeout or an asynchronous NCCL error
// aborts the communicator (ncclCommAbort) and ends the process.
std::shared_ptr<Communicator> make_nccl_communicator(const LaunchEnv& env, std::shared_ptr<KvStore> store,
                                                    std::shared_ptr<CommWatchdog> wd = nullptr);

}  // namespace flexcp
