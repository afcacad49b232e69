#include "core/run_consistency.h"

#include <ATen/ATen.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>

#include "core/errors.h"
#include "core/sha256.h"

namespace flexcp {

namespace {

// Console-only fields: a rank started with --quiet trains the same model.
bool may_differ_between_ranks(const std::string& key) { return key == "logging.quiet" || key == "logging.every"; }

void flatten(const YAML::Node& n, const std::string& prefix, std::vector<std::pair<std::string, std::string>>& out) {
  if (n.IsMap()) {
    for (const auto& kv : n) {
      const std::string key = kv.first.as<std::string>();
      flatten(kv.second, prefix.empty() ? key : prefix + "." + key, out);
    }
    return;
  }
  std::string v = n.IsScalar() ? n.Scalar() : YAML::Dump(n);
  for (size_t p = 0; (p = v.find('\n', p)) != std::string::npos; p += 2) v.replace(p, 1, "\\n");
  out.push_back({prefix, v});
}

std::map<std::string, std::string> parse_canonical(const std::string& text, std::vector<std::string>* order) {
  std::map<std::string, std::string> kv;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const auto sep = line.find(": ");
    if (sep == std::string::npos) continue;
    kv[line.substr(0, sep)] = line.substr(sep + 2);
    if (order) order->push_back(line.substr(0, sep));
  }
  return kv;
}

std::string hash_or_empty(const std::string& path) {
  try {
    return sha256_file(path);
  } catch (const std::exception&) {
    return "";  // reported as "cannot be read" when it differs; the data loader says why later
  }
}

std::string short_hash(const std::string& h) {
  if (h.empty()) return "unreadable";
  if (h == "-") return "synthetic data";
  return h.substr(0, 12);
}

constexpr size_t kField = 64;  // a hex digest; shorter markers are zero-padded

std::string join_ranks(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size() && i < 8; ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  if (ranks.size() > 8) s += " and " + std::to_string(ranks.size() - 8) + " more";
  return s;
}

std::vector<RankFingerprint> all_gather(Communicator& comm, at::Device device, const RankFingerprint& mine) {
  const int n = comm.size();
  std::vector<uint8_t> row(3 * kField, 0);
  auto put = [&](size_t slot, const std::string& s) {
    std::memcpy(row.data() + slot * kField, s.data(), std::min(s.size(), kField));
  };
  put(0, mine.binary);
  put(1, mine.config);
  put(2, mine.manifest);
  at::Tensor one = at::from_blob(row.data(), {1, static_cast<int64_t>(row.size())}, at::kByte);
  at::Tensor send = one.repeat({n, 1}).contiguous().to(device);
  at::Tensor got = comm.all_to_all_v(send, std::vector<int64_t>(n, 1), std::vector<int64_t>(n, 1)).to(at::kCPU).contiguous();
  std::vector<RankFingerprint> all(static_cast<size_t>(n));
  const auto* p = got.data_ptr<uint8_t>();
  auto get = [&](int r, size_t slot) {
    const char* s = reinterpret_cast<const char*>(p + static_cast<size_t>(r) * row.size() + slot * kField);
    return std::string(s, strnlen(s, kField));
  };
  for (int r = 0; r < n; ++r) all[r] = {get(r, 0), get(r, 1), get(r, 2)};
  return all;
}

}  // namespace

std::string config_canonical_text(const RunConfig& cfg) {
  std::vector<std::pair<std::string, std::string>> kv;
  flatten(YAML::Load(config_to_yaml(cfg)), "", kv);
  std::string out;
  for (const auto& [k, v] : kv)
    if (!may_differ_between_ranks(k)) out += k + ": " + v + "\n";
  return out;
}

std::string config_first_difference(const std::string& a, const std::string& b) {
  std::vector<std::string> order;
  const auto ka = parse_canonical(a, &order);
  const auto kb = parse_canonical(b, &order);
  for (const auto& key : order) {
    const auto ia = ka.find(key), ib = kb.find(key);
    const std::string va = ia == ka.end() ? "(absent)" : ia->second, vb = ib == kb.end() ? "(absent)" : ib->second;
    if (va != vb) return key + ": " + va + " vs " + vb;
  }
  return "";
}

RankFingerprint run_fingerprint(const RunConfig& cfg, const std::string& executable) {
  RankFingerprint f;
  f.binary = hash_or_empty(executable);
  f.config = sha256_hex(config_canonical_text(cfg));
  f.manifest = cfg.data.synthetic ? "-" : hash_or_empty((std::filesystem::path(cfg.data.path) / "manifest.json").string());
  return f;
}

void run_consistency_check(const RunConfig& cfg, Communicator& comm, at::Device device) {
  run_consistency_check(cfg, comm, device, run_fingerprint(cfg));
}

void run_consistency_check(const RunConfig& cfg, Communicator& comm, at::Device device, const RankFingerprint& mine) {
  if (comm.size() < 2) return;
  const std::vector<RankFingerprint> all = all_gather(comm, device, mine);
  std::vector<int> bin, conf, data;
  for (int r = 1; r < comm.size(); ++r) {
    if (all[r].binary != all[0].binary) bin.push_back(r);
    if (all[r].config != all[0].config) conf.push_back(r);
    if (all[r].manifest != all[0].manifest) data.push_back(r);
  }
  if (bin.empty() && conf.empty() && data.empty()) return;
  std::vector<std::string> parts;
  if (!conf.empty()) {
    // Every rank knows who differs, so all of them fetch the same two configs and print the same line.
    std::vector<uint8_t> text0, textk;
    const std::string mine_text = config_canonical_text(cfg);
    if (comm.rank() == 0) text0.assign(mine_text.begin(), mine_text.end());
    if (comm.rank() == conf[0]) textk.assign(mine_text.begin(), mine_text.end());
    comm.broadcast_bytes(text0, 0);
    comm.broadcast_bytes(textk, conf[0]);
    const std::string diff =
        config_first_difference(std::string(textk.begin(), textk.end()), std::string(text0.begin(), text0.end()));
    std::string s = join_ranks(conf) + (conf.size() == 1 ? "'s config differs" : "' configs differ") +
                    " from rank 0's (rank " + std::to_string(conf[0]) + " vs rank 0: " + diff + ")";
    parts.push_back(s);
  }
  if (!bin.empty())
    parts.push_back(join_ranks(bin) + " run" + (bin.size() == 1 ? "s" : "") +
                    " a different flexcp binary than rank 0 (sha256 " + short_hash(all[bin[0]].binary) + " vs " +
                    short_hash(all[0].binary) + ")");
  if (!data.empty())
    parts.push_back(join_ranks(data) + (data.size() == 1 ? "'s" : "'") + " data set differs from rank 0's (" +
                    (std::filesystem::path(cfg.data.path) / "manifest.json").string() + ": " +
                    short_hash(all[data[0]].manifest) + " vs " + short_hash(all[0].manifest) + ")");
  std::string what = "all ranks must run the same flexcp binary, config and data, but ";
  for (size_t i = 0; i < parts.size(); ++i) what += (i ? "; " : "") + parts[i];
  fail("startup check", what,
       "start every rank with the same command line and config, the same flexcp build and the same data folder "
       "(copied byte for byte to every node)");
}

}  // namespace flexcp
