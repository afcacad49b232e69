#include "core/comm.h"

#include <ATen/ATen.h>

#include <numeric>

namespace flexcp {

namespace {

class ReadyWork final : public CommWork {
 public:
  explicit ReadyWork(at::Tensor t) : t_(std::move(t)) {}
  at::Tensor wait() override { return t_; }

 private:
  at::Tensor t_;
};

class SingleProcessCommunicator final : public Communicator {
 public:
  std::string backend() const override { return "none"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  void all_reduce_sum(at::Tensor&) override {}
  at::Tensor all_to_all_v(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send, send_counts, recv_counts);
    return send.clone();
  }
  void broadcast_bytes(std::vector<uint8_t>&, int) override {}
  void barrier() override {}
  std::shared_ptr<Communicator> split(int, int) override { return std::make_shared<SingleProcessCommunicator>(); }
};

}  // namespace

std::unique_ptr<CommWork> comm_work_ready(at::Tensor result) { return std::make_unique<ReadyWork>(std::move(result)); }

std::unique_ptr<CommWork> Communicator::all_reduce_sum_async(at::Tensor& t) {
  all_reduce_sum(t);
  return comm_work_ready(t);
}

std::unique_ptr<CommWork> Communicator::all_to_all_v_async(const at::Tensor& send, const std::vector<int64_t>& send_counts,
                                                           const std::vector<int64_t>& recv_counts) {
  return comm_work_ready(all_to_all_v(send, send_counts, recv_counts));
}

std::shared_ptr<Communicator> make_single_process_communicator() {
  return std::make_shared<SingleProcessCommunicator>();
}

void comm_check_all_to_all(const Communicator& comm, const at::Tensor& send, const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts) {
  TORCH_CHECK(static_cast<int>(send_counts.size()) == comm.size() && static_cast<int>(recv_counts.size()) == comm.size(),
              "all_to_all_v: one count per rank expected (", comm.size(), " ranks)");
  TORCH_CHECK(send.dim() >= 1 && send.is_contiguous(), "all_to_all_v: send must be contiguous with a row dimension");
  const int64_t rows = std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0});
  TORCH_CHECK(rows == send.size(0), "all_to_all_v: send has ", send.size(0), " rows, counts add up to ", rows);
  TORCH_CHECK(send_counts[comm.rank()] == recv_counts[comm.rank()], "all_to_all_v: rows to self must match rows from self");
}

}  // namespace flexcp
