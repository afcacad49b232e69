#include <catch2/catch.hpp>

#include <chrono>
#include <thread>

#include "core/step_profiler.h"

using namespace flexcp;

TEST_CASE("step profiler times only the chosen step and adds up repeated phases", "[profiler]") {
  StepProfiler prof(c10::Device(c10::kCPU), 2);
  prof.begin(1);
  prof.mark("forward");
  CHECK(prof.end().empty());  // step 1 is not the chosen one

  prof.begin(2);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  prof.mark("forward");
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  prof.mark("backward");
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  prof.mark("forward");
  const auto phases = prof.end();
  REQUIRE(phases.size() == 2);
  CHECK(phases[0].first == "forward");
  CHECK(phases[1].first == "backward");
  CHECK(phases[0].second >= 40.0);  // two sleeps of 20 ms
  CHECK(phases[1].second >= 5.0);
  const std::string line = step_profile_format(phases);
  CHECK(line.find("forward") == 0);
  CHECK(line.find("total") != std::string::npos);

  StepProfiler off(c10::Device(c10::kCPU), 0);
  off.begin(1);
  off.mark("forward");
  CHECK(off.end().empty());
}
