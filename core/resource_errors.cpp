#include "core/resource_errors.h"

#include <cstdio>
#include <regex>

#include "core/errors.h"

namespace flexcp {

namespace {

// "Tried to allocate 2.00 GiB", "79.11 GiB total capacity", "you tried to allocate 4000000 bytes"...
std::string find_size(const std::string& msg, const char* pattern) {
  std::smatch m;
  if (std::regex_search(msg, m, std::regex(pattern, std::regex::icase))) return m[1].str();
  return {};
}

std::string bytes_text(const std::string& bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", std::stod(bytes) / double(1ull << 30));
  return buf;
}

}  // namespace

bool is_out_of_memory(const std::exception& e) {
  const std::string m = e.what();
  return m.find("out of memory") != std::string::npos || m.find("can't allocate memory") != std::string::npos ||
         m.find("OutOfMemory") != std::string::npos;
}

std::string out_of_memory_message(const RunConfig& cfg, int64_t world_size, const std::string& msg) {
  const bool gpu = msg.find("CUDA") != std::string::npos;
  std::string facts;
  auto add = [&](const std::string& label, const std::string& v) {
    if (!v.empty()) facts += (facts.empty() ? "" : ", ") + label + " " + v;
  };
  add("tried to allocate", find_size(msg, R"(tried to allocate ([0-9.]+ [KMGT]i?B))"));
  if (facts.empty()) {
    const std::string b = find_size(msg, R"(tried to allocate ([0-9]+) bytes)");
    if (!b.empty()) add("tried to allocate", bytes_text(b));
  }
  add("of", find_size(msg, R"(([0-9.]+ [KMGT]i?B) total capacity)"));
  add("GPU total", find_size(msg, R"(has a total capa[a-z]* of ([0-9.]+ [KMGT]i?B))"));
  add("already allocated", find_size(msg, R"(([0-9.]+ [KMGT]i?B) already allocated)"));
  add("free", find_size(msg, R"(([0-9.]+ [KMGT]i?B) (?:is )?free)"));
  add("in use by this process", find_size(msg, R"(this process has ([0-9.]+ [KMGT]i?B) memory in use)"));
  const auto& t = cfg.train;
  const std::string what = std::string(gpu ? "GPU" : "host") + " out of memory" + (facts.empty() ? "" : " (" + facts + ")") +
                           " with train.micro_batch " + std::to_string(t.micro_batch) + ", train.seq_len " +
                           std::to_string(t.seq_len) + ", activation_checkpointing " +
                           (t.activation_checkpointing ? "on" : "off") + ", parallel.cp " + std::to_string(cfg.parallel.cp) +
                           " of " + std::to_string(world_size) + " processes";
  std::string fix = "lower train.micro_batch";
  if (t.micro_batch > 1) fix += " (e.g. " + std::to_string(t.micro_batch / 2) + "; global_batch stays, grad accumulation grows)";
  if (!t.activation_checkpointing) fix += ", set train.activation_checkpointing: true";
  fix += ", or raise parallel.cp (each rank holds seq_len / cp tokens)";
  if (!gpu) fix += "; or pick a smaller model";
  return what + "; " + fix;
}

void check_runtime_resources(const RunConfig& cfg, int64_t world_size, bool cuda_available) {
  const auto& p = cfg.parallel;
  const bool on_gpu = cfg.train.device == "cuda" || (cfg.train.device == "auto" && cuda_available);
  if (cfg.train.device == "cuda" && !cuda_available)
    fail(cfg.source, "train.device: cuda, but no CUDA GPU is visible (or this flexcp was built with CPU LibTorch)",
         "check nvidia-smi and CUDA_VISIBLE_DEVICES, or set train.device: cpu");
#ifndef FLEXCP_WITH_NCCL
  if (p.communicator == "nccl" || (p.communicator == "auto" && on_gpu && world_size > 1))
    fail(cfg.source, "parallel.communicator: " + p.communicator + " needs NCCL for " + std::to_string(world_size) +
                         " GPU processes, but this flexcp was built without NCCL",
         "rebuild on a machine with libnccl-dev and CUDA LibTorch (docs/gpu-build.md), or use communicator: mpi");
#endif
#ifndef FLEXCP_WITH_MPI
  if (p.communicator == "mpi" || (p.communicator == "auto" && !on_gpu && world_size > 1))
    fail(cfg.source, "parallel.communicator: " + p.communicator + " needs MPI for " + std::to_string(world_size) +
                         " processes, but this flexcp was built without MPI",
         "install libopenmpi-dev and rebuild");
#endif
  (void)on_gpu;
  (void)world_size;
}

}  // namespace flexcp
