// Start-up consistency of a multi-process run: every rank must run the same flexcp binary, the same
// resolved config and the same data set. Ranks that differ would train different things, or
// disagree on the collectives and hang; instead each rank hashes (SHA-256) its binary
// (/proc/self/exe), its resolved config and the data set's manifest.json (which holds every shard's
// hash), the hashes are gathered on every rank, and any difference stops every rank with the same
// one-line UserError naming the ranks and what differs (for the config, the first differing key).
//
// Config fields that may legitimately differ between ranks are left out of the hash:
// logging.quiet and logging.every (console output only).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "core/comm.h"
#include "core/config.h"

namespace flexcp {

struct RankFingerprint {
  std::string binary;    // sha256 hex of the executable; "" when it cannot be read
  std::string config;    // sha256 hex of config_canonical_text
  std::string manifest;  // sha256 hex of <data.path>/manifest.json; "-" for synthetic data, "" when unreadable
};

// The resolved config as "key: value" lines, every field in table order, minus the fields that may
// differ between ranks.
std::string config_canonical_text(const RunConfig& cfg);

RankFingerprint run_fingerprint(const RunConfig& cfg, const std::string& executable = "/proc/self/exe");

// Collective: gathers every rank's fingerprint and throws the same UserError on every rank when they
// differ. `device` is where the communicator takes tensors (the run's device).
void run_consistency_check(const RunConfig& cfg, Communicator& comm, at::Device device);
// The same with a given fingerprint (tests).
void run_consistency_check(const RunConfig& cfg, Communicator& comm, at::Device device, const RankFingerprint& mine);

// "train.lr: 0.001 vs 0.003" for the first key whose value differs between two canonical texts
// (a's value first); "" when they are equal.
std::string config_first_difference(const std::string& a, const std::string& b);

}  // namespace flexcp
