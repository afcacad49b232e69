// The A/B switches read from the environment (FLEXCP_FUSED_OPS=0, FLEXCP_FFA_DETERMINISTIC=1, ...;
// docs/gpu.md lists them): for timing one path against another and for ruling a fast path out when
// chasing a numerical question. Header-only: a few lines, called once per process per switch.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace flexcp {

// default_on: on unless NAME is "0"; else off unless NAME is "1".
inline bool env_switch(const char* name, bool default_on) {
  const char* v = std::getenv(name);
  if (v == nullptr) return default_on;
  return default_on ? std::strcmp(v, "0") != 0 : std::strcmp(v, "1") == 0;
}

// A positive integer from NAME, else `fallback`.
inline int64_t env_positive_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const long long n = v != nullptr ? std::atoll(v) : 0;
  return n > 0 ? static_cast<int64_t>(n) : fallback;
}

// An integer from NAME (0 and negative numbers included) when it is set to one, else `fallback`.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  return *end == '\0' ? static_cast<int64_t>(n) : fallback;
}

// A positive number from NAME (fractions allowed) up to `max`, else `fallback`.
inline double env_positive_number(const char* name, double fallback, double max) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  return *end == '\0' && x > 0 && x <= max ? x : fallback;
}

}  // namespace flexcp
