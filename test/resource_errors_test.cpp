// Resource errors (core/resource_errors.h): out-of-memory messages carry the numbers and the fix;
// configs that need a GPU or a communicator this build lacks are refused before training.
#include <catch2/catch.hpp>
#include <sys/wait.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "core/config.h"
#include "core/errors.h"
#include "core/resource_errors.h"
#include "test/test_util.h"

using namespace flexcp;

namespace {
RunConfig cfg_with(const std::string& extra) {
  return config_from_string("model:\n  preset: tiny\ndata:\n  synthetic: true\ntrain:\n  micro_batch: 4\n  global_batch: 8\n" + extra,
                            "r.yaml");
}
}  // namespace

TEST_CASE("out of memory: CUDA message gives sizes, config and fixes", "[resources]") {
  const std::string torch_msg =
      "CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.11 GiB total capacity; 75.02 GiB already allocated; "
      "1.20 GiB free; 76.00 GiB reserved in total by PyTorch)";
  CHECK(is_out_of_memory(std::runtime_error(torch_msg)));
  CHECK_FALSE(is_out_of_memory(std::runtime_error("shape mismatch")));
  const std::string m = out_of_memory_message(cfg_with(""), 8, torch_msg);
  CHECK_THAT(m, Catch::StartsWith("GPU out of memory"));
  CHECK_THAT(m, Catch::Contains("tried to allocate 2.50 GiB") && Catch::Contains("of 79.11 GiB") &&
                    Catch::Contains("already allocated 75.02 GiB") && Catch::Contains("free 1.20 GiB"));
  CHECK_THAT(m, Catch::Contains("train.micro_batch 4") && Catch::Contains("e.g. 2") &&
                    Catch::Contains("activation_checkpointing: true") && Catch::Contains("parallel.cp"));
  // Already checkpointing: not suggested again.
  CHECK_THAT(out_of_memory_message(cfg_with("  activation_checkpointing: true\n"), 1, torch_msg),
             !Catch::Contains("set train.activation_checkpointing"));
}

TEST_CASE("out of memory: the CPU allocator's message in bytes", "[resources]") {
  const std::string m = out_of_memory_message(
      cfg_with(""), 1, "[enforce fail at alloc_cpu.cpp:75] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes.");
  CHECK_THAT(m, Catch::StartsWith("host out of memory (tried to allocate 4.00 GiB)"));
}

TEST_CASE("a huge model on CPU exits with code 2 and the out-of-memory advice", "[resources][cli]") {
  const std::string cmd = std::string(FLEXCP_BINARY) + " train " + FLEXCP_SOURCE_DIR +
                          "/configs/tiny.yaml --set data.synthetic=true --set model.vocab_size=4000000 "
                          "--set model.hidden_size=262144 --set model.num_heads=2048 --set model.num_kv_heads=2048 "
                          "--set model.head_dim=128 --set train.device=cpu --set logging.dir=/tmp/flexcp_oom_test";
  const auto [rc, out] = flexcp::test::shell_run(cmd);
  CHECK(rc == 2);
  CHECK_THAT(out, Catch::Contains("host out of memory (tried to allocate") && Catch::Contains("lower train.micro_batch"));
}

TEST_CASE("a GPU config without a GPU or NCCL is refused up front", "[resources]") {
  CHECK_THROWS_WITH(check_runtime_resources(cfg_with("  device: cuda\n"), 1, /*cuda_available=*/false),
                    Catch::Contains("no CUDA GPU is visible"));
#ifndef FLEXCP_WITH_NCCL
  CHECK_THROWS_WITH(check_runtime_resources(cfg_with("parallel:\n  communicator: nccl\n"), 2, true), Catch::Contains("without NCCL"));
  CHECK_THROWS_WITH(check_runtime_resources(cfg_with(""), 8, /*cuda_available=*/true), Catch::Contains("needs NCCL"));
#endif
  CHECK_NOTHROW(check_runtime_resources(cfg_with("  device: cpu\n"), 1, false));
}
