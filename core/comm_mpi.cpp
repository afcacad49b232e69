// The MPI communicator (OpenMPI from Debian): the CPU path under mpirun, used by the CI.
// Tensors on other devices are staged through host memory.
//
// Faults: our communicator returns errors instead of aborting inside MPI (MPI_ERRORS_RETURN), so a
// failed collective becomes one line naming this rank and the call (RankFailure, exit code 3);
// the process then ends with MPI_Abort instead of MPI_Finalize (which would wait for the ranks that
// are gone), so mpirun tears the job down. A rank that dies outright is reported by mpirun itself
// ("mpirun noticed that process rank 2 ... exited on signal 9"); one that hangs is caught by the
// collective watchdog (comm_watchdog.h), whose abort is MPI_Abort too.
#include <ATen/ATen.h>
#include <mpi.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <numeric>

#include "core/comm.h"
#include "core/comm_mpi.h"
#include "core/comm_watchdog.h"
#include "core/errors.h"

namespace flexcp {

namespace {

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  TORCH_CHECK(false, "MPI ", what, " failed: ", std::string(msg, static_cast<size_t>(len)));
}

// Set when a collective failed: the exit path then aborts the job instead of finalizing.
std::atomic<bool> g_mpi_failed{false};

// A failed collective: the job cannot go on.
void mpi_comm_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  g_mpi_failed = true;
  if (comm_watchdog_stopping()) comm_watchdog_hold();  // this rank's watchdog is already ending the job
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0, rank = -1;
  MPI_Error_string(rc, msg, &len);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  throw RankFailure("rank " + std::to_string(rank) + ": MPI " + what + " failed (" +
                    std::string(msg, static_cast<size_t>(len)) +
                    "): another rank died or the network failed; stopping (mpirun's report names the rank that failed)");
}

bool mpi_finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "MPI ", what, ": ", v, " does not fit MPI's int counts");
  return static_cast<int>(v);
}

// Rows of `t` as one MPI datatype, so counts stay small for big tensors.
class RowType {
 public:
  explicit RowType(int64_t row_bytes) {
    mpi_check(MPI_Type_contiguous(checked_int(row_bytes, "row size"), MPI_BYTE, &type_), "Type_contiguous");
    mpi_check(MPI_Type_commit(&type_), "Type_commit");
  }
  ~RowType() {
    if (!mpi_finalized()) MPI_Type_free(&type_);
  }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

struct AllToAllArgs {
  std::vector<int> sc, sd, rc, rd;
};

AllToAllArgs all_to_all_args(const std::vector<int64_t>& send_counts, const std::vector<int64_t>& recv_counts) {
  AllToAllArgs a;
  int64_t so = 0, ro = 0;
  for (size_t p = 0; p < send_counts.size(); ++p) {
    a.sc.push_back(checked_int(send_counts[p], "count"));
    a.sd.push_back(checked_int(so, "displacement"));
    a.rc.push_back(checked_int(recv_counts[p], "count"));
    a.rd.push_back(checked_int(ro, "displacement"));
    so += send_counts[p];
    ro += recv_counts[p];
  }
  return a;
}

at::Tensor recv_buffer(const at::Tensor& send, const std::vector<int64_t>& recv_counts) {
  auto sizes = send.sizes().vec();
  sizes[0] = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
  return at::empty(sizes, send.options().device(at::kCPU));
}

// From the shape, not numel / rows: a rank that sends no rows still receives rows of this size.
int64_t row_bytes(const at::Tensor& t) {
  int64_t b = static_cast<int64_t>(t.element_size());
  for (int64_t d = 1; d < t.dim(); ++d) b *= t.size(d);
  return std::max<int64_t>(b, 1);
}

// MPI_Ialltoallv in flight: owns the buffers and the datatype until wait().
class MpiAllToAllWork final : public CommWork {
 public:
  MpiAllToAllWork(MPI_Comm comm, at::Tensor send, const std::vector<int64_t>& send_counts,
                  const std::vector<int64_t>& recv_counts, at::Device out_device, CommWatchdog::Scope scope)
      : comm_(comm),
        scope_(std::move(scope)),
        send_(send.to(at::kCPU).contiguous()),
        recv_(recv_buffer(send, recv_counts)),
        args_(all_to_all_args(send_counts, recv_counts)),
        type_(row_bytes(send)),
        device_(out_device) {
    mpi_comm_check(MPI_Ialltoallv(send_.data_ptr(), args_.sc.data(), args_.sd.data(), type_.get(), recv_.data_ptr(),
                                  args_.rc.data(), args_.rd.data(), type_.get(), comm, &req_),
                   "Ialltoallv");
  }
  ~MpiAllToAllWork() override {
    if (req_ != MPI_REQUEST_NULL && !mpi_finalized() && !g_mpi_failed) MPI_Wait(&req_, MPI_STATUS_IGNORE);
  }
  at::Tensor wait() override {
    if (req_ != MPI_REQUEST_NULL) mpi_comm_check(MPI_Wait(&req_, MPI_STATUS_IGNORE), "Ialltoallv (wait)");
    scope_.end();
    return recv_.to(device_);
  }

 private:
  MPI_Comm comm_;
  CommWatchdog::Scope scope_;  // watched from the start until wait() returns
  at::Tensor send_, recv_;
  AllToAllArgs args_;
  RowType type_;
  at::Device device_;
  MPI_Request req_ = MPI_REQUEST_NULL;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned, int local_rank, std::shared_ptr<CommWatchdog> wd)
      : comm_(comm), owned_(owned), local_rank_(local_rank), wd_(std::move(wd)) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (owned_ && !mpi_finalized()) MPI_Comm_free(&comm_);
  }
  std::string backend() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }

  void all_reduce_sum(at::Tensor& t) override {
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum: tensor must be contiguous");
    at::Tensor host = t.device().is_cpu() ? t : t.to(at::kCPU);
    MPI_Datatype type = MPI_DATATYPE_NULL;
    switch (host.scalar_type()) {
      case at::kFloat: type = MPI_FLOAT; break;
      case at::kDouble: type = MPI_DOUBLE; break;
      case at::kLong: type = MPI_INT64_T; break;
      case at::kInt: type = MPI_INT32_T; break;
      default: break;
    }
    if (type == MPI_DATATYPE_NULL) {  // bf16 / fp16: sum in fp32
      at::Tensor f = host.to(at::kFloat);
      all_reduce_sum(f);
      t.copy_(f);
      return;
    }
    const int64_t n = host.numel();
    char* p = static_cast<char*>(host.data_ptr());
    const int64_t step = INT_MAX / 2;
    auto watched = comm_watch(wd_, "all_reduce_sum");
    for (int64_t off = 0; off < n; off += step) {
      const int cnt = static_cast<int>(std::min(step, n - off));
      mpi_comm_check(MPI_Allreduce(MPI_IN_PLACE, p + off * host.element_size(), cnt, type, MPI_SUM, comm_), "Allreduce");
    }
    if (!t.device().is_cpu()) t.copy_(host);
  }

  at::Tensor all_to_all_v(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& recv_counts) override {
    return all_to_all_v_async(send, send_counts, recv_counts)->wait();
  }

  std::unique_ptr<CommWork> all_to_all_v_async(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                                               const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send, send_counts, recv_counts);
    return std::make_unique<MpiAllToAllWork>(comm_, send, send_counts, recv_counts, send.device(),
                                             comm_watch(wd_, "all_to_all_v"));
  }

  void broadcast_bytes(std::vector<uint8_t>& bytes, int root) override {
    auto watched = comm_watch(wd_, "broadcast_bytes");
    int64_t n = static_cast<int64_t>(bytes.size());
    mpi_comm_check(MPI_Bcast(&n, 1, MPI_INT64_T, root, comm_), "Bcast");
    bytes.resize(static_cast<size_t>(n));
    if (n > 0)
      mpi_comm_check(MPI_Bcast(bytes.data(), checked_int(n, "broadcast size"), MPI_BYTE, root, comm_), "Bcast");
  }

  void barrier() override {
    auto watched = comm_watch(wd_, "barrier");
    mpi_comm_check(MPI_Barrier(comm_), "Barrier");
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
    auto watched = comm_watch(wd_, "split");
    MPI_Comm sub = MPI_COMM_NULL;
    mpi_comm_check(MPI_Comm_split(comm_, color, key, &sub), "Comm_split");
    return std::make_shared<MpiCommunicator>(sub, true, local_rank_, wd_);
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  int local_rank_;
  std::shared_ptr<CommWatchdog> wd_;  // shared with the communicators split from this one
  int rank_ = 0, size_ = 1;
};

}  // namespace

void mpi_ensure_initialized() {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "Init_thread");
  // We started MPI, so we end it; communicators freed after this check MPI_Finalized first. After a
  // failed collective, MPI_Finalize would wait for the ranks that are gone: abort the job instead.
  std::atexit([] {
    if (mpi_finalized()) return;
    if (g_mpi_failed) MPI_Abort(MPI_COMM_WORLD, kRankFailureExitCode);
    MPI_Finalize();
  });
}

std::shared_ptr<Communicator> make_mpi_communicator(std::shared_ptr<CommWatchdog> wd) {
  mpi_ensure_initialized();
  MPI_Comm node = MPI_COMM_NULL;
  int local_rank = 0;
  mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node), "Comm_split_type");
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  MPI_Comm world = MPI_COMM_NULL;
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &world), "Comm_dup");
  // Errors come back to mpi_comm_check (one clear line) instead of aborting inside the library.
  MPI_Comm_set_errhandler(world, MPI_ERRORS_RETURN);
  if (wd) wd->add_abort([] { MPI_Abort(MPI_COMM_WORLD, kRankFailureExitCode); });
  return std::make_shared<MpiCommunicator>(world, true, local_rank, std::move(wd));
}

void mpi_broadcast_world(void* data, int64_t bytes, int root) {
  mpi_ensure_initialized();
  mpi_check(MPI_Bcast(data, checked_int(bytes, "broadcast size"), MPI_BYTE, root, MPI_COMM_WORLD), "Bcast");
}

}  // namespace flexcp
