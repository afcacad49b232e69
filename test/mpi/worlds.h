// The world communicators the multi-process tests run against: MPI, and the socket communicator
// set up through the c10d TCPStore rendezvous (as `flexcp launch` or torchrun would), with the
// store's port chosen by rank 0 and shared over MPI.
#pragma once
#include <arpa/inet.h>
#include <mpi.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "core/comm.h"
#include "core/comm_mpi.h"
#include "core/rendezvous.h"
#include "test/test_util.h"

namespace flexcp_test {

using flexcp::test::free_tcp_port;

inline std::shared_ptr<flexcp::Communicator> mpi_world() {
  static auto w = flexcp::make_mpi_communicator();
  return w;
}

inline flexcp::LaunchEnv tcp_env() {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int port = rank == 0 ? free_tcp_port() : 0;
  MPI_Bcast(&port, 1, MPI_INT, 0, MPI_COMM_WORLD);
  flexcp::LaunchEnv e;
  e.launcher = "torchrun";
  e.rank = rank;
  e.world_size = size;
  e.local_rank = rank;
  e.local_world_size = size;
  e.master_addr = "127.0.0.1";
  e.master_port = port;
  return e;
}

inline std::shared_ptr<flexcp::Communicator> tcp_world() {
  static auto w = flexcp::communicator_create("tcp", false, tcp_env());
  return w;
}

inline std::vector<std::shared_ptr<flexcp::Communicator>> all_worlds() { return {mpi_world(), tcp_world()}; }

}  // namespace flexcp_test
