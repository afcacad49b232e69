// User-facing errors. A UserError is bad input (a config, a file, a flag): the CLI prints its
// one-line message and exits with code 2. Anything else that escapes is a bug and exits with 1.
#pragma once
#include <stdexcept>
#include <string>

namespace flexcp {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

// A distributed fault: another rank died, hung or closed its connection (core/comm_watchdog.h).
// The CLI prints its one-line message and exits with code 3, so scripts can tell it from bad input
// (2) and bugs (1).
class RankFailure : public std::runtime_error {
 public:
  explicit RankFailure(const std::string& message) : std::runtime_error(message) {}
};
// Exit code of a process stopped by a distributed fault (RankFailure or the collective watchdog).
constexpr int kRankFailureExitCode = 3;

// "<where>: <what>; <fix>" is the shape every message should have, for example
// "configs/x.yaml: train.lr: expected a number, got 'fast'; write e.g. lr: 3.0e-4".
[[noreturn]] inline void fail(const std::string& where, const std::string& what, const std::string& fix = {}) {
  std::string msg = where.empty() ? what : where + ": " + what;
  if (!fix.empty()) msg += "; " + fix;
  throw UserError(msg);
}

}  // namespace flexcp
