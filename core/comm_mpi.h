// The MPI back-end (defined in comm_mpi.cpp, built only when MPI is found: FLEXCP_WITH_MPI).
#pragma once
#include <cstdint>
#include <memory>

#include "core/comm.h"

namespace flexcp {

class CommWatchdog;

// Initializes MPI when nobody has (and finalizes it at exit); a no-op when the program already did.
void mpi_ensure_initialized();
// A communicator over MPI_COMM_WORLD (a duplicate, so our traffic never mixes with the caller's).
// With a watchdog, every collective is watched and a timeout ends the job with MPI_Abort.
std::shared_ptr<Communicator> make_mpi_communicator(std::shared_ptr<CommWatchdog> wd = nullptr);
// Broadcast raw bytes over MPI_COMM_WORLD (the NCCL unique id under mpirun).
void mpi_broadcast_world(void* data, int64_t bytes, int root);

}  // namespace flexcp
