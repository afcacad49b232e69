// The NCCL communicator: GPU runs under any launcher. Collectives run on the current CUDA stream;
// all_to_all_v_async runs on a side stream so that the next stage's K/V transfer overlaps the
// attention of this stage (docs/context-parallel.md, step 5).
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
#include <numeric>

#include "core/comm.h"
#include "core/comm_nccl.h"
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
  NcclCommunicator(ncclComm_t comm, int local_rank)
      : comm_(comm),
        local_rank_(local_rank),
        device_(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank)),
        side_(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(local_rank))) {
    FLEXCP_NCCL(ncclCommUserRank(comm_, &rank_));
    FLEXCP_NCCL(ncclCommCount(comm_, &size_));
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
  }
  std::string backend() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }

  void all_reduce_sum(at::Tensor& t) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum: tensor must be contiguous");
    c10::cuda::CUDAGuard guard(device_);
    FLEXCP_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                              ncclSum, comm_, at::cuda::getCurrentCUDAStream().stream()));
  }

  at::Tensor all_to_all_v(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send, send_counts, recv_counts);
    check_device(send);
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor recv = recv_like(send, recv_counts);
    all_to_all_issue(comm_, size_, send, recv, send_counts, recv_counts, at::cuda::getCurrentCUDAStream().stream());
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
    const int64_t len = n.item<int64_t>();
    if (len == 0) {
      bytes.clear();
      return;
    }
    at::Tensor buf = rank_ == root ? at::from_blob(bytes.data(), {len}, at::kByte).to(device_)
                                   : at::empty({len}, at::TensorOptions().dtype(at::kByte).device(device_));
    FLEXCP_NCCL(ncclBroadcast(buf.data_ptr(), buf.data_ptr(), static_cast<size_t>(len), ncclUint8, root, comm_, stream.stream()));
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
    FLEXCP_NCCL(ncclCommSplit(comm_, color, key, &sub, nullptr));
    return std::make_shared<NcclCommunicator>(sub, local_rank_);
#else
    fail("nccl", "splitting a communicator needs NCCL 2.18 or newer", "update NCCL");
#endif
  }

 private:
  void check_device(const at::Tensor& t) const {
    TORCH_CHECK(t.device() == device_, "NCCL communicator: tensor on ", t.device(), ", expected ", device_);
  }
  at::Tensor recv_like(const at::Tensor& send, const std::vector<int64_t>& recv_counts) const {
    auto sizes = send.sizes().vec();
    sizes[0] = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
    return at::empty(sizes, send.options());
  }

  ncclComm_t comm_ = nullptr;
  int local_rank_;
  at::Device device_;
  c10::cuda::CUDAStream side_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(const LaunchEnv& env, std::shared_ptr<KvStore> store) {
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
  FLEXCP_NCCL(ncclCommInitRank(&comm, env.world_size, id, env.rank));
  return std::make_shared<NcclCommunicator>(comm, env.local_rank);
}

}  // namespace flexcp
