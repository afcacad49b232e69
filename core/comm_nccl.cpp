// The NCCL communicator: GPU runs under any launcher. Collectives run on the current CUDA stream;
// all_to_all_v_async runs on a side stream so that the next stage's K/V transfer overlaps the
// attention of this stage (docs/context-parallel.md, step 5), and all_reduce_sum_async so that the
// gradient all-reduce overlaps the backward (core/grad_reducer.h; on a communicator of its own, as
// one communicator's collectives must not run on two streams at once).
//
// Faults (comm_watchdog.h): NCCL calls return as soon as the work is queued, so a collective stuck
// on a dead or hung peer shows up as a kernel that never ends. Each collective records a CUDA event
// after itself; the watchdog polls the events and NCCL's asynchronous error
// (ncclCommGetAsyncError: a peer's connection closed, a network error), and on a timeout or an
// error calls ncclCommAbort, which releases the stuck kernels, before the process exits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <mutex>
#include <numeric>

#include "core/comm.h"
#include "core/comm_nccl.h"
#include "core/comm_watchdog.h"
#include "core/errors.h"
#include "core/rendezvous.h"
#ifdef FLEXCP_WITH_MPI
#include "core/comm_mpi.h"
#endif

namespace flexcp {

namespace {

#define FLEXCP_NCCL(call)                                                                          \
  do {                                                                                             \
    ncclResult_t rc_ = (call);                                                                     \
    TORCH_CHECK(rc_ == ncclSuccess, "NCCL ", #call, " failed: ", ncclGetErrorString(rc_));          \
  } while (0)

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    default: break;
  }
  TORCH_CHECK(false, "NCCL: unsupported dtype ", t);
  return ncclFloat32;
}

// Issues the grouped sends and receives of an all-to-all-v on `stream`.
void all_to_all_issue(ncclComm_t comm, int size, const at::Tensor& send, const at::Tensor& recv,
                      const std::vector<int64_t>& send_counts, const std::vector<int64_t>& recv_counts,
                      cudaStream_t stream) {
  size_t row = send.element_size();
  for (int64_t d = 1; d < send.dim(); ++d) row *= static_cast<size_t>(send.size(d));
  const char* sp = static_cast<const char*>(send.data_ptr());
  char* rp = static_cast<char*>(recv.data_ptr());
  size_t so = 0, ro = 0;
  FLEXCP_NCCL(ncclGroupStart());
  for (int p = 0; p < size; ++p) {
    const size_t sb = static_cast<size_t>(send_counts[p]) * row, rb = static_cast<size_t>(recv_counts[p]) * row;
    if (sb) FLEXCP_NCCL(ncclSend(sp + so, sb, ncclUint8, p, comm, stream));
    if (rb) FLEXCP_NCCL(ncclRecv(rp + ro, rb, ncclUint8, p, comm, stream));
    so += sb;
    ro += rb;
  }
  FLEXCP_NCCL(ncclGroupEnd());
}

// The communicator handle, shared with the watchdog's hooks, which run on the watchdog thread and
// may outlive the communicator: the mutex orders abort and error polling against destruction.
class NcclHandle {
 public:
  explicit NcclHandle(ncclComm_t comm) : comm_(comm) {}
  ~NcclHandle() { destroy(); }
  void destroy() {
    std::lock_guard<std::mutex> lk(m_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    comm_ = nullptr;
  }
  void abort() {
    std::lock_guard<std::mutex> lk(m_);
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  // Empty while all is well; else what NCCL says went wrong (a peer's connection closed, ...).
  std::string async_error() {
    std::lock_guard<std::mutex> lk(m_);
    if (comm_ == nullptr) return {};
    ncclResult_t r = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess || r == ncclSuccess) return {};
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
    if (r == ncclInProgress) return {};
#endif
    std::string msg = std::string("NCCL reported an asynchronous error (") + ncclGetErrorString(r);
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && *last != '\0') msg += ": " + std::string(last);
#endif
    return msg + "): a peer died or the network failed";
  }

 private:
  std::mutex m_;
  ncclComm_t comm_;
};

// A CUDA event recorded right after a collective on its stream; done() when the collective is.
// Plain CUDA runtime calls (no ATen), as done() runs on the watchdog thread.
class StreamMark {
 public:
  StreamMark(cudaStream_t stream, int device) : device_(device) {
    if (cudaEventCreateWithFlags(&ev_, cudaEventDisableTiming) != cudaSuccess) ev_ = nullptr;
    if (ev_ != nullptr && cudaEventRecord(ev_, stream) != cudaSuccess) {
      cudaEventDestroy(ev_);
      ev_ = nullptr;
    }
    if (ev_ == nullptr) (void)cudaGetLastError();  // not watched; the collective's own errors surface later
  }
  ~StreamMark() {
    if (ev_ == nullptr) return;
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    cudaEventDestroy(ev_);
    cudaSetDevice(prev);
  }
  StreamMark(const StreamMark&) = delete;
  StreamMark& operator=(const StreamMark&) = delete;
  bool done() const {
    if (ev_ == nullptr) return true;
    cudaSetDevice(device_);  // the calling thread's device (the watchdog thread's own)
    const cudaError_t r = cudaEventQuery(ev_);
    if (r == cudaErrorNotReady) return false;
    if (r != cudaSuccess) (void)cudaGetLastError();  // a sticky error: the main thread reports it
    return true;
  }

 private:
  int device_;
  cudaEvent_t ev_ = nullptr;
};

class NcclWork final : public CommWork {
 public:
  NcclWork(at::Tensor recv, std::shared_ptr<at::cuda::CUDAEvent> done) : recv_(std::move(recv)), done_(std::move(done)) {}
  at::Tensor wait() override {
    done_->block(at::cuda::getCurrentCUDAStream());
    return recv_;
  }

 private:
  at::Tensor recv_;
  std::shared_ptr<at::cuda::CUDAEvent> done_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int local_rank, std::shared_ptr<CommWatchdog> wd)
      : handle_(std::make_shared<NcclHandle>(comm)),
        comm_(comm),
        local_rank_(local_rank),
        device_(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank)),
        side_(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(local_rank))),
        wd_(std::move(wd)) {
    FLEXCP_NCCL(ncclCommUserRank(comm_, &rank_));
    FLEXCP_NCCL(ncclCommCount(comm_, &size_));
    if (wd_) {
      std::shared_ptr<NcclHandle> h = handle_;
      wd_->add_abort([h] { h->abort(); });
      wd_->add_error_probe([h] { return h->async_error(); });
    }
  }
  ~NcclCommunicator() override { handle_->destroy(); }
  std::string backend() const override { return "nccl"; }
  bool can_split() const override {
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    return true;
#else
    return false;
#endif
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }

  void all_reduce_sum(at::Tensor& t) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum: tensor must be contiguous");
    c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    FLEXCP_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                              ncclSum, comm_, stream));
    watch_stream(stream, "all_reduce_sum");
  }

  std::unique_ptr<CommWork> all_reduce_sum_async(at::Tensor& t) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum_async: tensor must be contiguous");
    c10::cuda::CUDAGuard guard(device_);
    // As in all_to_all_v_async: the side stream starts after what is queued so far (t's producer),
    // and the allocator must not hand t's memory out again before the side stream is done with it.
    at::cuda::CUDAEvent ready;
    ready.record(at::cuda::getCurrentCUDAStream());
    ready.block(side_);
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), side_);
    FLEXCP_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                              ncclSum, comm_, side_.stream()));
    watch_stream(side_.stream(), "all_reduce_sum");
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(side_);
    return std::make_unique<NcclWork>(t, done);
  }

  at::Tensor all_to_all_v(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send, send_counts, recv_counts);
    check_device(send);
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor recv = recv_like(send, recv_counts);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    all_to_all_issue(comm_, size_, send, recv, send_counts, recv_counts, stream);
    watch_stream(stream, "all_to_all_v");
    return recv;
  }

  std::unique_ptr<CommWork> all_to_all_v_async(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                                               const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send, send_counts, recv_counts);
    check_device(send);
    c10::cuda::CUDAGuard guard(device_);
    auto compute = at::cuda::getCurrentCUDAStream();
    at::Tensor recv = recv_like(send, recv_counts);
    // The side stream starts after what is queued so far (send's producer), and the allocator must
    // not hand out send's or recv's memory again before the side stream is done with it.
    at::cuda::CUDAEvent ready;
    ready.record(compute);
    ready.block(side_);
    c10::cuda::CUDACachingAllocator::recordStream(send.storage().data_ptr(), side_);
    c10::cuda::CUDACachingAllocator::recordStream(recv.storage().data_ptr(), side_);
    all_to_all_issue(comm_, size_, send, recv, send_counts, recv_counts, side_.stream());
    watch_stream(side_.stream(), "all_to_all_v");
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(side_);
    return std::make_unique<NcclWork>(recv, done);
  }

  void broadcast_bytes(std::vector<uint8_t>& bytes, int root) override {
    if (size_ == 1) return;
    c10::cuda::CUDAGuard guard(device_);
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor n = at::full({1}, static_cast<int64_t>(bytes.size()), at::TensorOptions().dtype(at::kLong).device(device_));
    FLEXCP_NCCL(ncclBroadcast(n.data_ptr(), n.data_ptr(), 1, ncclInt64, root, comm_, stream.stream()));
    watch_stream(stream.stream(), "broadcast_bytes");
    const int64_t len = n.item<int64_t>();
    if (len == 0) {
      bytes.clear();
      return;
    }
    at::Tensor buf = rank_ == root ? at::from_blob(bytes.data(), {len}, at::kByte).to(device_)
                                   : at::empty({len}, at::TensorOptions().dtype(at::kByte).device(device_));
    FLEXCP_NCCL(ncclBroadcast(buf.data_ptr(), buf.data_ptr(), static_cast<size_t>(len), ncclUint8, root, comm_, stream.stream()));
    watch_stream(stream.stream(), "broadcast_bytes");
    at::Tensor host = buf.to(at::kCPU);
    bytes.assign(host.data_ptr<uint8_t>(), host.data_ptr<uint8_t>() + len);
  }

  void barrier() override {
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(device_));
    all_reduce_sum(one);
    at::cuda::getCurrentCUDAStream().synchronize();
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    c10::cuda::CUDAGuard guard(device_);
    ncclComm_t sub = nullptr;
    {
      auto watched = comm_watch(wd_, "split");  // blocks the host until every rank has called it
      FLEXCP_NCCL(ncclCommSplit(comm_, color, key, &sub, nullptr));
    }
    return std::make_shared<NcclCommunicator>(sub, local_rank_, wd_);
#else
    fail("nccl", "splitting a communicator needs NCCL 2.18 or newer", "update NCCL");
#endif
  }

 private:
  void check_device(const at::Tensor& t) const {
    TORCH_CHECK(t.device() == device_, "NCCL communicator: tensor on ", t.device(), ", expected ", device_);
  }
  // Watches the collective just queued on `stream` until the GPU is past it.
  void watch_stream(cudaStream_t stream, const char* what) {
    if (!wd_) return;
    auto mark = std::make_shared<StreamMark>(stream, local_rank_);
    wd_->watch_async(what, [mark] { return mark->done(); });
  }
  at::Tensor recv_like(const at::Tensor& send, const std::vector<int64_t>& recv_counts) const {
    auto sizes = send.sizes().vec();
    sizes[0] = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
    return at::empty(sizes, send.options());
  }

  std::shared_ptr<NcclHandle> handle_;  // owns comm_
  ncclComm_t comm_ = nullptr;
  int local_rank_;
  at::Device device_;
  c10::cuda::CUDAStream side_;
  std::shared_ptr<CommWatchdog> wd_;  // shared with the communicators split from this one
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(const LaunchEnv& env, std::shared_ptr<KvStore> store,
                                                    std::shared_ptr<CommWatchdog> wd) {
  const int gpus = static_cast<int>(c10::cuda::device_count());
  if (env.local_rank >= gpus)
    fail("nccl", "local rank " + std::to_string(env.local_rank) + " has no GPU (" + std::to_string(gpus) + " visible)",
         "start at most one process per GPU (--nproc-per-node, -np, CUDA_VISIBLE_DEVICES)");
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(env.local_rank));
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  if (env.rank == 0) FLEXCP_NCCL(ncclGetUniqueId(&id));
  if (env.world_size > 1) {
    if (store) {
      if (env.rank == 0)
        store->set("flexcp/nccl/id", std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&id), reinterpret_cast<uint8_t*>(&id) + sizeof id));
      const auto v = store->get("flexcp/nccl/id");
      TORCH_CHECK(v.size() == sizeof id, "NCCL unique id of the wrong size in the store");
      std::memcpy(&id, v.data(), sizeof id);
    } else {
#ifdef FLEXCP_WITH_MPI
      mpi_broadcast_world(&id, sizeof id, 0);
#else
      TORCH_CHECK(false, "NCCL rendezvous needs MPI or a store");
#endif
    }
  }
  ncclComm_t comm = nullptr;
  {
    auto watched = comm_watch(wd, "ncclCommInitRank");  // waits for every rank to join
    FLEXCP_NCCL(ncclCommInitRank(&comm, env.world_size, id, env.rank));
  }
  return std::make_shared<NcclCommunicator>(comm, env.local_rank, std::move(wd));
}

}  // namespace flexcp
