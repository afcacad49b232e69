// `flexcp launch --nproc-per-node N -- train cfg.yaml ...`: a single-node, torchrun-style launcher,
// so multi-process runs need neither Python nor mpirun. It starts N copies of this executable with
// RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; rank 0 serves the
// rendezvous store on MASTER_PORT. When one rank fails, the others are stopped and its exit code
// is returned; SIGINT / SIGTERM are passed on to every rank.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "app/command_registry.h"
#include "core/errors.h"

extern char** environ;

namespace flexcp {
namespace {

struct LaunchOptions {
  int nproc = 1;
  int port = 0;
  std::string addr = "127.0.0.1";
  std::vector<std::string> command;
};

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

int pick_free_port(const std::string& addr) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  if (::inet_pton(AF_INET, addr.c_str(), &a.sin_addr) != 1) a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    if (fd >= 0) ::close(fd);
    fail("launch", std::string("cannot find a free TCP port on ") + addr + ": " + std::strerror(errno),
         "pass --master-port");
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string self_executable() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) fail("launch", "cannot find this executable (/proc/self/exe)");
  return std::string(buf, static_cast<size_t>(n));
}

// Our variables replace any inherited launcher variables (an outer mpirun's or torchrun's).
std::vector<std::string> child_environment(const LaunchOptions& o, int rank) {
  const char* drop[] = {"RANK=", "LOCAL_RANK=", "WORLD_SIZE=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT=",
                        "OMPI_COMM_WORLD_", "PMIX_RANK=", "SLURM_PROCID=", "SLURM_NTASKS=",
                        "NCCL_NVLS_ENABLE=", "TORCH_SYMM_MEM_DISABLE_MULTICAST=", "NVSHMEM_DISABLE_NVLS="};
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string s(*e);
    bool keep = true;
    for (const char* d : drop)
      if (s.rfind(d, 0) == 0) keep = false;
    if (keep) env.push_back(s);
  }
  env.push_back("RANK=" + std::to_string(rank));
  env.push_back("LOCAL_RANK=" + std::to_string(rank));
  env.push_back("WORLD_SIZE=" + std::to_string(o.nproc));
  env.push_back("LOCAL_WORLD_SIZE=" + std::to_string(o.nproc));
  env.push_back("MASTER_ADDR=" + o.addr);
  env.push_back("MASTER_PORT=" + std::to_string(o.port));
  // NVLink multicast (NVLS) stays off in every rank, whatever the caller's environment says: it
  // fails or hangs on the GPU hosts we run on (docs/launching.md).
  env.push_back("NCCL_NVLS_ENABLE=0");
  env.push_back("TORCH_SYMM_MEM_DISABLE_MULTICAST=1");
  env.push_back("NVSHMEM_DISABLE_NVLS=1");
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

int launch_run(LaunchOptions o) {
  if (o.command.empty()) fail("launch", "no command given", "write e.g. flexcp launch --nproc-per-node 2 -- train cfg.yaml");
  if (o.command[0] == "launch") fail("launch", "cannot launch `launch` itself");
  if (o.port == 0) o.port = pick_free_port(o.addr);
  const std::string exe = self_executable();

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: waitpid returns EINTR so the signal can be passed on
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::vector<pid_t> pids;
  std::vector<bool> done;
  for (int r = 0; r < o.nproc; ++r) {
    std::vector<std::string> args{exe};
    args.insert(args.end(), o.command.begin(), o.command.end());
    std::vector<std::string> env = child_environment(o, r);
    auto argv = c_strings(args);
    auto envp = c_strings(env);
    pid_t pid = 0;
    const int rc = ::posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv.data(), envp.data());
    if (rc != 0) {
      for (pid_t p : pids) ::kill(p, SIGTERM);
      for (pid_t p : pids) ::waitpid(p, nullptr, 0);
      fail("launch", "cannot start rank " + std::to_string(r) + ": " + std::strerror(rc));
    }
    pids.push_back(pid);
    done.push_back(false);
  }
  std::cerr << "flexcp launch: " << o.nproc << " processes, rendezvous at " << o.addr << ":" << o.port << "\n";

  int first_failure = 0, left = o.nproc;
  bool stopping = false;
  auto stop_others = [&](int sig) {
    for (size_t i = 0; i < pids.size(); ++i)
      if (!done[i]) ::kill(pids[i], sig);
  };
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (left > 0) {
    if (g_signal != 0) {
      stop_others(g_signal);
      if (first_failure == 0) first_failure = 128 + g_signal;
      g_signal = 0;
      stopping = true;
      deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    }
    int status = 0;
    // Poll while stopping, so ranks that ignore SIGTERM get SIGKILL after the grace period.
    const pid_t pid = ::waitpid(-1, &status, stopping ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;  // no children left
    }
    if (pid == 0) {
      if (std::chrono::steady_clock::now() > deadline) stop_others(SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] != pid || done[i]) continue;
      done[i] = true;
      --left;
      const int code = exit_code_of(status);
      if (code != 0 && first_failure == 0) {
        first_failure = code;
        std::cerr << "flexcp launch: rank " << i << " exited with code " << code << "; stopping the other ranks\n";
      }
      if (code != 0 && !stopping) {
        stopping = true;
        stop_others(SIGTERM);
        deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      }
    }
  }
  return first_failure;
}

void setup_launch(CLI::App& sub) {
  auto o = std::make_shared<LaunchOptions>();
  sub.add_option("--nproc-per-node", o->nproc, "processes to start on this node (one per GPU on a GPU run)")
      ->required()
      ->check(CLI::Range(1, 1024));
  sub.add_option("--master-port", o->port, "TCP port of rank 0's rendezvous store; 0 picks a free one")
      ->check(CLI::Range(0, 65535));
  sub.add_option("--master-addr", o->addr, "address of rank 0 (this node)");
  sub.add_option("command", o->command, "the flexcp command every rank runs, after --, e.g. -- train cfg.yaml")
      ->required();
  sub.footer("Example: flexcp launch --nproc-per-node 4 -- train configs/tiny-cp4.yaml");
  sub.callback([o] { command_exit_code() = launch_run(*o); });
}

CommandRegistration reg("launch", "Start N ranks of a flexcp command on this node (torchrun-style)", setup_launch);

}  // namespace
}  // namespace flexcp
