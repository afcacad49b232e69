#include "core/fault_inject.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "core/errors.h"

namespace flexcp {

namespace {

struct StepHook {
  int64_t rank = -1, step = -1;
};

StepHook hook_from_env(const char* name) {
  StepHook h;
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return h;
  char* end = nullptr;
  h.rank = std::strtoll(v, &end, 10);
  if (end == v || *end != ':') fail(name, std::string("'") + v + "' is not RANK:STEP", "write e.g. 2:3");
  const char* s = end + 1;
  h.step = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || h.rank < 0 || h.step < 1)
    fail(name, std::string("'") + v + "' is not RANK:STEP", "write e.g. 2:3");
  return h;
}

}  // namespace

void fault_inject_at_step(int64_t rank, int64_t step) {
  static const StepHook die = hook_from_env("FLEXCP_TEST_DIE_AT_STEP");
  static const StepHook hang = hook_from_env("FLEXCP_TEST_HANG_AT_STEP");
  if (die.rank == rank && die.step == step) {
    std::fprintf(stderr, "FLEXCP_TEST_DIE_AT_STEP: rank %lld kills itself at step %lld\n", static_cast<long long>(rank),
                 static_cast<long long>(step));
    std::fflush(stderr);
    std::raise(SIGKILL);
  }
  if (hang.rank == rank && hang.step == step) {
    std::fprintf(stderr, "FLEXCP_TEST_HANG_AT_STEP: rank %lld hangs at step %lld\n", static_cast<long long>(rank),
                 static_cast<long long>(step));
    std::fflush(stderr);
    while (true) std::this_thread::sleep_for(std::chrono::hours(1));
  }
}

}  // namespace flexcp
