// The A/B switches read from the environment (core/env_switch.h). env_int must take "0": that is how a
// user selects the v7 FFA kernels (FLEXCP_FFA_FWD_KERNEL=0) now that the defaults are other numbers.
#include <catch2/catch.hpp>
#include <stdlib.h>

#include "core/env_switch.h"

namespace {

constexpr const char* kName = "FLEXCP_TEST_ENV_SWITCH";

struct ScopedEnv {
  explicit ScopedEnv(const char* value) {
    if (value != nullptr)
      ::setenv(kName, value, 1);
    else
      ::unsetenv(kName);
  }
  ~ScopedEnv() { ::unsetenv(kName); }
};

}  // namespace

TEST_CASE("env_switch: default on unless '0', default off unless '1'", "[env]") {
  {
    ScopedEnv e(nullptr);
    CHECK(flexcp::env_switch(kName, true));
    CHECK_FALSE(flexcp::env_switch(kName, false));
  }
  {
    ScopedEnv e("0");
    CHECK_FALSE(flexcp::env_switch(kName, true));
    CHECK_FALSE(flexcp::env_switch(kName, false));
  }
  {
    ScopedEnv e("1");
    CHECK(flexcp::env_switch(kName, true));
    CHECK(flexcp::env_switch(kName, false));
  }
}

TEST_CASE("env_positive_int ignores zero and garbage; env_int takes any integer", "[env]") {
  {
    ScopedEnv e(nullptr);
    CHECK(flexcp::env_positive_int(kName, 7) == 7);
    CHECK(flexcp::env_int(kName, 3) == 3);
  }
  {
    ScopedEnv e("0");
    CHECK(flexcp::env_positive_int(kName, 7) == 7);
    CHECK(flexcp::env_int(kName, 3) == 0);
  }
  {
    ScopedEnv e("-2");
    CHECK(flexcp::env_int(kName, 3) == -2);
  }
  {
    ScopedEnv e("2048");
    CHECK(flexcp::env_positive_int(kName, 7) == 2048);
    CHECK(flexcp::env_int(kName, 3) == 2048);
  }
  for (const char* bad : {"", "x", "4x", "1.5"}) {
    ScopedEnv e(bad);
    CHECK(flexcp::env_int(kName, 3) == 3);
  }
}
