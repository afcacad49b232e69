// The socket communicator: CPU runs started without mpirun (flexcp launch, torchrun, Slurm).
// Each pair of ranks shares one TCP connection, set up through the rendezvous store; every
// collective is a set of point-to-point messages driven by poll(), so no pair can deadlock.
// Messages carry their length, which the receiver checks against what it expects.
//
// Faults: a peer whose socket closes (EOF, ECONNRESET, EPIPE) died or exited; the collective stops
// at once with "rank R (host:port) closed its connection" (RankFailure, exit code 3). A rank that
// stops this way first sends a goodbye (a header no message can have, naming the rank that closed
// first) to every peer whose stream is at a message boundary, so that the ranks it leaves behind
// name the rank that died, not the messenger. A peer that is alive but silent is left to the
// collective watchdog (comm_watchdog.h): poll() here waits without a limit of its own.
#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <numeric>
#include <thread>

#include "core/comm.h"
#include "core/comm_heartbeat.h"
#include "core/comm_watchdog.h"
#include "core/errors.h"
#include "core/rendezvous.h"

namespace flexcp {

namespace {

[[noreturn]] void sys_fail(const std::string& what) {
  TORCH_CHECK(false, "tcp communicator: ", what, ": ", std::strerror(errno));
}

// The header of a goodbye: this tag in the high 32 bits, the rank that closed first in the low ones.
// As a message length it would be 1.7e19 bytes, so it cannot be mistaken for one.
constexpr uint64_t kGoodbyeTag = 0xF1E8C0DEull;

// One message each way with one peer in an exchange.
struct Transfer {
  int peer = -1;  // world rank
  const uint8_t* send = nullptr;
  uint64_t send_len = 0;
  uint8_t* recv = nullptr;
  uint64_t recv_len = 0;
  bool do_send = false, do_recv = false;
  // progress
  uint64_t sent = 0, got = 0;  // counting the 8-byte header
  uint64_t send_hdr = 0, recv_hdr = 0;
};

// The sockets of this process to every other rank of the world; shared by split communicators.
class Mesh {
 public:
  Mesh(std::shared_ptr<KvStore> store, const LaunchEnv& env) : store_(std::move(store)), rank_(env.rank), size_(env.world_size) {
    fds_.assign(static_cast<size_t>(size_), -1);
    const int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0) sys_fail("socket");
    int one = 1;
    ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = 0;
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) sys_fail("bind");
    if (::listen(lfd, size_) != 0) sys_fail("listen");
    socklen_t len = sizeof addr;
    ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
    // Peers on this node reach us over loopback; others by host name.
    std::string host = "127.0.0.1";
    if (env.local_world_size < env.world_size) {
      char name[256] = {0};
      ::gethostname(name, sizeof name - 1);
      host = name;
    }
    const std::string me = host + ":" + std::to_string(ntohs(addr.sin_port));
    store_->set("flexcp/tcp/addr/" + std::to_string(rank_), std::vector<uint8_t>(me.begin(), me.end()));
    // Lower ranks accept, higher ranks connect; the first 4 bytes say who is calling.
    for (int p = 0; p < rank_; ++p) {
      const auto v = store_->get("flexcp/tcp/addr/" + std::to_string(p));
      fds_[p] = connect_to(std::string(v.begin(), v.end()));
      const int32_t r = rank_;
      write_all(fds_[p], &r, sizeof r);
    }
    for (int n = rank_ + 1; n < size_; ++n) {
      const int fd = ::accept(lfd, nullptr, nullptr);
      if (fd < 0) sys_fail("accept");
      int32_t r = -1;
      read_all(fd, &r, sizeof r);
      TORCH_CHECK(r > rank_ && r < size_ && fds_[r] < 0, "tcp communicator: unexpected peer rank ", r);
      fds_[r] = fd;
    }
    ::close(lfd);
    // Every rank's listening address, for messages (all are in the store by now: each rank writes
    // its own before it connects or accepts).
    addrs_.resize(static_cast<size_t>(size_));
    for (int p = 0; p < size_; ++p) {
      const auto v = p == rank_ ? std::vector<uint8_t>(me.begin(), me.end()) : store_->get("flexcp/tcp/addr/" + std::to_string(p));
      addrs_[p] = std::string(v.begin(), v.end());
    }
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      ::setsockopt(fds_[p], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ::fcntl(fds_[p], F_SETFL, ::fcntl(fds_[p], F_GETFL) | O_NONBLOCK);
    }
  }
  ~Mesh() {
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
  }
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int rank() const { return rank_; }

  // Runs every transfer to completion, all at once. `what` names the collective in messages.
  void exchange(std::vector<Transfer>& xs, const char* what) {
    what_ = what;
    current_ = &xs;
    for (auto& x : xs) {
      x.send_hdr = x.send_len;
      x.sent = x.got = 0;
    }
    std::vector<pollfd> pfds;
    std::vector<Transfer*> owners;
    while (true) {
      pfds.clear();
      owners.clear();
      for (auto& x : xs) {
        short ev = 0;
        if (x.do_send && x.sent < 8 + x.send_len) ev |= POLLOUT;
        if (x.do_recv && x.got < 8 + x.recv_len) ev |= POLLIN;
        if (ev) {
          pfds.push_back({fds_[x.peer], ev, 0});
          owners.push_back(&x);
        }
      }
      if (pfds.empty()) {
        current_ = nullptr;
        return;
      }
      // No limit: a silent peer is the watchdog's (parallel.timeout_s).
      const int n = ::poll(pfds.data(), pfds.size(), -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        sys_fail("poll");
      }
      for (size_t i = 0; i < pfds.size(); ++i) {
        Transfer& x = *owners[i];
        const short re = pfds[i].revents;
        // Data or its end first, so that a peer that closed is reported as closed.
        if ((re & (POLLIN | POLLHUP | POLLERR)) && x.do_recv && x.got < 8 + x.recv_len) step_recv(x);
        if (re & (POLLERR | POLLNVAL)) peer_gone(x, "connection error");
        if ((re & POLLOUT) && x.do_send && x.sent < 8 + x.send_len) step_send(x);
        if ((re & POLLHUP) && x.do_send && x.sent < 8 + x.send_len) peer_gone(x, "hang-up");
      }
    }
  }

  // A peer's socket closed or broke: that process died or exited, unless it left a goodbye naming
  // the rank whose connection closed under it first.
  [[noreturn]] void peer_gone(const Transfer& x, const std::string& how) {
    if (comm_watchdog_stopping()) comm_watchdog_hold();  // this rank's watchdog is already on it
    // Our message from this peer is complete (or none was due): a goodbye may be the next header.
    if (!x.do_recv || x.got == 8 + x.recv_len) {
      uint64_t hdr = 0;
      if (::recv(fds_[x.peer], &hdr, sizeof hdr, MSG_PEEK | MSG_DONTWAIT) == static_cast<ssize_t>(sizeof hdr) &&
          (hdr >> 32) == kGoodbyeTag)
        peer_stopped_for(x.peer, static_cast<int>(hdr & 0xffffffffu));
    }
    const std::string who = "rank " + std::to_string(rank_) + ": rank " + std::to_string(x.peer) + " (" +
                            addrs_[x.peer] + ") closed its connection during " + what_;
    // A peer whose own collective timed out left a note in the store (comm_heartbeat.h).
    if (heartbeat_rank_stopped(*store_, x.peer))
      throw RankFailure(who + " after its own collective timed out (its line names the late rank); stopping this rank");
    say_goodbye(x.peer);
    throw RankFailure(who + " (" + how + "): it died or exited (its own output or the launcher's says why); stopping this rank");
  }

  // `peer` said goodbye: it stopped because `culprit`'s connection closed.
  [[noreturn]] void peer_stopped_for(int peer, int culprit) {
    if (culprit < 0 || culprit >= size_) culprit = peer;
    say_goodbye(culprit);
    throw RankFailure("rank " + std::to_string(rank_) + ": rank " + std::to_string(culprit) + " (" + addrs_[culprit] +
                      ") died or exited: rank " + std::to_string(peer) +
                      " saw its connection close first and stopped, closing its own during " + what_ +
                      "; stopping this rank");
  }

  // Best effort, never blocks: peers in the middle of a message from us get a plain close instead.
  void say_goodbye(int culprit) {
    const uint64_t hdr = (kGoodbyeTag << 32) | static_cast<uint32_t>(culprit);
    for (int p = 0; p < size_; ++p) {
      if (p == rank_ || p == culprit || fds_[p] < 0) continue;
      bool mid_message = false;
      if (current_ != nullptr)
        for (const auto& x : *current_)
          if (x.peer == p && x.do_send && x.sent > 0 && x.sent < 8 + x.send_len) mid_message = true;
      if (!mid_message) (void)::send(fds_[p], &hdr, sizeof hdr, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
  }

  static void write_all(int fd, const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t k = ::send(fd, c, n, MSG_NOSIGNAL);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) sys_fail("send");
      c += k;
      n -= static_cast<size_t>(k);
    }
  }
  static void read_all(int fd, void* p, size_t n) {
    char* c = static_cast<char*>(p);
    while (n > 0) {
      const ssize_t k = ::recv(fd, c, n, 0);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) sys_fail("recv");
      c += k;
      n -= static_cast<size_t>(k);
    }
  }
  static int connect_to(const std::string& hostport) {
    const auto colon = hostport.rfind(':');
    const std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr)
      TORCH_CHECK(false, "tcp communicator: cannot resolve ", host);
    int fd = -1;
    for (int attempt = 0; attempt < 100; ++attempt) {
      fd = ::socket(AF_INET, SOCK_STREAM, 0);
      if (::connect(fd, res->ai_addr, res->ai_addrlen) == 0) break;
      ::close(fd);
      fd = -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ::freeaddrinfo(res);
    if (fd < 0) sys_fail("connect to " + hostport);
    return fd;
  }
  void step_send(Transfer& x) {
    const int fd = fds_[x.peer];
    while (x.sent < 8 + x.send_len) {
      const uint8_t* src;
      uint64_t left;
      if (x.sent < 8) {
        src = reinterpret_cast<const uint8_t*>(&x.send_hdr) + x.sent;
        left = 8 - x.sent;
      } else {
        src = x.send + (x.sent - 8);
        left = x.send_len - (x.sent - 8);
      }
      const ssize_t k = ::send(fd, src, std::min<uint64_t>(left, 1 << 22), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (errno == EPIPE || errno == ECONNRESET) peer_gone(x, std::strerror(errno));
        sys_fail("send to rank " + std::to_string(x.peer));
      }
      x.sent += static_cast<uint64_t>(k);
    }
  }
  void step_recv(Transfer& x) {
    const int fd = fds_[x.peer];
    while (x.got < 8 + x.recv_len) {
      uint8_t* dst;
      uint64_t left;
      if (x.got < 8) {
        dst = reinterpret_cast<uint8_t*>(&x.recv_hdr) + x.got;
        left = 8 - x.got;
      } else {
        dst = x.recv + (x.got - 8);
        left = x.recv_len - (x.got - 8);
      }
      const ssize_t k = ::recv(fd, dst, std::min<uint64_t>(left, 1 << 22), MSG_DONTWAIT);
      if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (errno == ECONNRESET || errno == EPIPE) peer_gone(x, std::strerror(errno));
        sys_fail("recv from rank " + std::to_string(x.peer));
      }
      if (k == 0) peer_gone(x, "end of stream");
      x.got += static_cast<uint64_t>(k);
      if (x.got == 8 && (x.recv_hdr >> 32) == kGoodbyeTag) peer_stopped_for(x.peer, static_cast<int>(x.recv_hdr & 0xffffffffu));
      if (x.got == 8)
        TORCH_CHECK(x.recv_hdr == x.recv_len, "tcp communicator: rank ", x.peer, " sent ", x.recv_hdr,
                    " bytes where ", x.recv_len, " were expected (the ranks disagree on the call order or sizes)");
    }
  }

  std::shared_ptr<KvStore> store_;  // kept: rank 0 serves it while others may still read it
  int rank_, size_;
  std::vector<int> fds_;
  std::vector<std::string> addrs_;  // host:port each rank listened on
  const char* what_ = "";           // the collective in progress, for messages
  const std::vector<Transfer>* current_ = nullptr;  // its transfers (for say_goodbye)
};

class TcpCommunicator final : public Communicator {
 public:
  TcpCommunicator(std::shared_ptr<Mesh> mesh, std::vector<int> members, int local_rank, std::shared_ptr<CommWatchdog> wd)
      : mesh_(std::move(mesh)), members_(std::move(members)), local_rank_(local_rank), wd_(std::move(wd)) {
    rank_ = static_cast<int>(std::find(members_.begin(), members_.end(), mesh_->rank()) - members_.begin());
  }
  std::string backend() const override { return "tcp"; }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  int local_rank() const override { return local_rank_; }

  // Reduce-scatter, then all-gather, each one exchange: every rank sends 2 (n-1)/n of the tensor.
  // Rank p sums slice p in rank order and hands it to everyone, so every rank gets the same bits.
  void all_reduce_sum(at::Tensor& t) override {
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum: tensor must be contiguous");
    const int n = size();
    if (n == 1) return;
    auto watched = comm_watch(wd_, "all_reduce_sum");
    const bool low = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
    at::Tensor mine = (low ? t.to(at::kFloat) : t).to(at::kCPU).contiguous().view({-1});
    const int64_t N = mine.numel(), esz = static_cast<int64_t>(mine.element_size());
    auto lo = [&](int p) { return N * p / n; };
    auto bytes_of = [&](int p) { return static_cast<uint64_t>((lo(p + 1) - lo(p)) * esz); };
    auto* base = static_cast<uint8_t*>(mine.data_ptr());
    std::vector<at::Tensor> parts(static_cast<size_t>(n));
    std::vector<Transfer> xs;
    for (int p = 0; p < n; ++p) {
      if (p == rank_) continue;
      parts[p] = at::empty({lo(rank_ + 1) - lo(rank_)}, mine.options());
      Transfer x;
      x.peer = members_[p];
      x.send = base + lo(p) * esz;
      x.send_len = bytes_of(p);
      x.recv = static_cast<uint8_t*>(parts[p].data_ptr());
      x.recv_len = bytes_of(rank_);
      x.do_send = x.do_recv = true;
      xs.push_back(x);
    }
    mesh_->exchange(xs, "all_reduce_sum");
    parts[rank_] = mine.narrow(0, lo(rank_), lo(rank_ + 1) - lo(rank_));
    at::Tensor acc = parts[0].clone();
    for (int p = 1; p < n; ++p) acc.add_(parts[p]);
    xs.clear();
    for (int p = 0; p < n; ++p) {
      if (p == rank_) continue;
      Transfer x;
      x.peer = members_[p];
      x.send = static_cast<const uint8_t*>(acc.data_ptr());
      x.send_len = bytes_of(rank_);
      x.recv = base + lo(p) * esz;
      x.recv_len = bytes_of(p);
      x.do_send = x.do_recv = true;
      xs.push_back(x);
    }
    mesh_->exchange(xs, "all_reduce_sum");
    mine.narrow(0, lo(rank_), lo(rank_ + 1) - lo(rank_)).copy_(acc);
    if (low || !t.device().is_cpu() || mine.data_ptr() != t.data_ptr()) t.copy_(mine.view(t.sizes()));
  }

  at::Tensor all_to_all_v(const at::Tensor& send_in, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& recv_counts) override {
    comm_check_all_to_all(*this, send_in, send_counts, recv_counts);
    auto watched = comm_watch(wd_, "all_to_all_v");
    at::Tensor send = send_in.to(at::kCPU).contiguous();
    auto sizes = send.sizes().vec();
    sizes[0] = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
    at::Tensor recv = at::empty(sizes, send.options());
    uint64_t row_bytes = send.element_size();
    for (int64_t d = 1; d < send.dim(); ++d) row_bytes *= static_cast<uint64_t>(send.size(d));
    std::vector<Transfer> xs;
    uint64_t so = 0, ro = 0;
    for (int p = 0; p < size(); ++p) {
      const uint64_t sb = static_cast<uint64_t>(send_counts[p]) * row_bytes, rb = static_cast<uint64_t>(recv_counts[p]) * row_bytes;
      if (p == rank_) {
        if (sb) std::memcpy(static_cast<uint8_t*>(recv.data_ptr()) + ro, static_cast<const uint8_t*>(send.data_ptr()) + so, sb);
      } else {
        Transfer x;
        x.peer = members_[p];
        x.send = static_cast<const uint8_t*>(send.data_ptr()) + so;
        x.send_len = sb;
        x.recv = static_cast<uint8_t*>(recv.data_ptr()) + ro;
        x.recv_len = rb;
        x.do_send = x.do_recv = true;
        xs.push_back(x);
      }
      so += sb;
      ro += rb;
    }
    mesh_->exchange(xs, "all_to_all_v");
    return recv.to(send_in.device());
  }

  void broadcast_bytes(std::vector<uint8_t>& bytes, int root) override {
    if (size() == 1) return;
    auto watched = comm_watch(wd_, "broadcast_bytes");
    uint64_t n = bytes.size();
    exchange_from_root(&n, sizeof n, root);
    bytes.resize(static_cast<size_t>(n));
    exchange_from_root(bytes.data(), n, root);
  }

  void barrier() override {
    auto watched = comm_watch(wd_, "barrier");
    std::vector<Transfer> xs;
    for (int p = 0; p < size(); ++p) {
      if (p == rank_) continue;
      Transfer x;
      x.peer = members_[p];
      x.do_send = x.do_recv = true;
      xs.push_back(x);
    }
    mesh_->exchange(xs, "barrier");
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
    // All-gather (color, key), then every rank derives the same groups.
    at::Tensor mine = at::tensor(std::vector<int64_t>{color, key}, at::kLong).view({1, 2});
    at::Tensor all = all_to_all_v(mine.repeat({size(), 1}).contiguous(), std::vector<int64_t>(size(), 1),
                                  std::vector<int64_t>(size(), 1));
    auto a = all.accessor<int64_t, 2>();
    std::vector<std::pair<int64_t, int>> group;  // (key, rank in this communicator)
    for (int p = 0; p < size(); ++p)
      if (a[p][0] == color) group.push_back({a[p][1], p});
    std::sort(group.begin(), group.end());
    std::vector<int> members;
    for (const auto& g : group) members.push_back(members_[g.second]);
    return std::make_shared<TcpCommunicator>(mesh_, members, local_rank_, wd_);
  }

 private:
  void exchange_from_root(void* data, uint64_t n, int root) {
    std::vector<Transfer> xs;
    if (rank_ == root) {
      for (int p = 0; p < size(); ++p) {
        if (p == rank_) continue;
        Transfer x;
        x.peer = members_[p];
        x.send = static_cast<const uint8_t*>(data);
        x.send_len = n;
        x.do_send = true;
        xs.push_back(x);
      }
    } else {
      Transfer x;
      x.peer = members_[root];
      x.recv = static_cast<uint8_t*>(data);
      x.recv_len = n;
      x.do_recv = true;
      xs.push_back(x);
    }
    mesh_->exchange(xs, "broadcast_bytes");
  }

  std::shared_ptr<Mesh> mesh_;
  std::vector<int> members_;  // world ranks, in this communicator's rank order
  int local_rank_;
  std::shared_ptr<CommWatchdog> wd_;  // shared with the communicators split from this one
  int rank_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_tcp_communicator(std::shared_ptr<KvStore> store, const LaunchEnv& env,
                                                   std::shared_ptr<CommWatchdog> wd) {
  auto mesh = std::make_shared<Mesh>(std::move(store), env);
  std::vector<int> members(static_cast<size_t>(env.world_size));
  std::iota(members.begin(), members.end(), 0);
  return std::make_shared<TcpCommunicator>(mesh, members, env.local_rank, std::move(wd));
}

}  // namespace flexcp
