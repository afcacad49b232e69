#include "core/metrics_log.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include "core/atomic_file.h"
#include "core/errors.h"

namespace flexcp {

MetricsLog::MetricsLog(const std::string& path, int64_t steps_done) {
  std::vector<std::string> kept;
  {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("step") && j["step"].get<int64_t>() <= steps_done) kept.push_back(line);
    }
  }
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  // Rewritten atomically: a crash here must not lose the records of the steps before the checkpoint.
  std::string text;
  for (const auto& l : kept) text += l + "\n";
  write_file_atomic(path, text);
  file_ = std::fopen(path.c_str(), "a");
  if (!file_) fail(path, "cannot open the metrics file for writing", "check logging.dir and its permissions");
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const nlohmann::json& record) {
  const std::string s = record.dump();
  std::fprintf(file_, "%s\n", s.c_str());
  std::fflush(file_);
}

std::string human_count(double x) {
  const char* units[] = {"", "k", "M", "G", "T"};
  int u = 0;
  while (std::fabs(x) >= 1000.0 && u < 4) {
    x /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.2f%s" : "%.0f%s", x, units[u]);
  return buf;
}

std::string human_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof(buf), "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60) std::snprintf(buf, sizeof(buf), "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof(buf), "%lds", s);
  return buf;
}

}  // namespace flexcp
