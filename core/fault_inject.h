// Test hooks of the distributed-fault tests (test/mpi/dead_rank_test.sh), read from the environment:
//   FLEXCP_TEST_DIE_AT_STEP=R:S    rank R kills itself with SIGKILL at the start of step S (1-based)
//   FLEXCP_TEST_HANG_AT_STEP=R:S   rank R sleeps forever at the start of step S
// Like FLEXCP_INJECT_NONFINITE (numerics_guard.h), they let the tests drive the real code paths.
#pragma once
#include <cstdint>

namespace flexcp {

// Called by the trainer at the start of every step (before any collective of that step).
void fault_inject_at_step(int64_t rank, int64_t step);

}  // namespace flexcp
