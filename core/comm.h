// Communicators: the few collectives flexcp needs, behind one interface with four back-ends:
//   none  one process (no-op collectives)                          comm.cpp
//   mpi   MPI (OpenMPI from Debian; the CPU path under mpirun)     comm_mpi.cpp
//   tcp   sockets between ranks (CPU runs started by `flexcp launch`, torchrun or Slurm) comm_tcp.cpp
//   nccl  NCCL on CUDA tensors (GPU runs, any launcher)           comm_nccl.cpp
// communicator_create (rendezvous.h) picks one from the launcher's environment.
//
// Every call is collective: all ranks of the communicator make the same calls in the same order.
// Tensors are contiguous; dim 0 counts "rows" for all_to_all_v.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace flexcp {

// A transfer in flight. wait() returns the received tensor. On GPU back-ends it makes the current
// stream wait for the transfer (the host does not block), so compute queued before wait() overlaps.
class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual at::Tensor wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string backend() const = 0;  // "none", "mpi", "tcp", "nccl"
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_rank() const = 0;  // rank among the processes of this node (GPU index)

  // Sum over ranks, in place. Every rank ends with the same bits.
  virtual void all_reduce_sum(at::Tensor& t) = 0;
  // The same, started now and finished by wait() (which returns t); t must not be read or written
  // before then. The default runs it at once (CPU back-ends). NCCL runs it on a side stream after
  // what the current stream has queued so far, so compute queued meanwhile overlaps it (the
  // gradient all-reduce during the backward, core/grad_reducer.h).
  virtual std::unique_ptr<CommWork> all_reduce_sum_async(at::Tensor& t);

  // Rows of `send` are grouped by destination: send_counts[p] rows for rank p, in rank order. The
  // result holds recv_counts[p] rows from each rank p, in rank order, with send's dtype, device and
  // trailing shape. Counts must agree pairwise (my send_counts[p] == p's recv_counts[me]).
  virtual at::Tensor all_to_all_v(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                                  const std::vector<int64_t>& recv_counts) = 0;
  // The same, started now and finished by wait(). The default runs it at once.
  virtual std::unique_ptr<CommWork> all_to_all_v_async(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                                                       const std::vector<int64_t>& recv_counts);

  // Root's bytes end up on every rank (other ranks' vectors are resized).
  virtual void broadcast_bytes(std::vector<uint8_t>& bytes, int root) = 0;
  virtual void barrier() = 0;

  // A communicator of the ranks that pass the same color, ranked by key (ties: by rank).
  virtual std::shared_ptr<Communicator> split(int color, int key) = 0;
  // Whether split works in this build (NCCL needs 2.18 or newer).
  virtual bool can_split() const { return true; }
};

// A CommWork whose result is already there.
std::unique_ptr<CommWork> comm_work_ready(at::Tensor result);

std::shared_ptr<Communicator> make_single_process_communicator();

// Checks the arguments of all_to_all_v against the communicator size and the tensor; throws on misuse.
void comm_check_all_to_all(const Communicator& comm, const at::Tensor& send, const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts);

}  // namespace flexcp
