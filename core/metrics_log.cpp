#include "core/metrics_log.h"

#include <unistd.h>

#include <cmath>
#include <iterator>
#include <filesystem>
#include <fstream>
#include <vector>

#include "core/atomic_file.h"
#include "core/errors.h"

namespace flexcp {

namespace {
const char* const kCsvColumns[] = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                                   "step_ms", "mfu", "peak_mem_gib", "val_loss"};
}  // namespace

MetricsLog::MetricsLog(const std::string& path, int64_t steps_done, bool csv) {
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
  if (csv) {
    const auto csv_path = std::filesystem::path(path).replace_extension(".csv");
    csv_ = std::fopen(csv_path.c_str(), "w");
    if (!csv_) fail(csv_path.string(), "cannot open the CSV metrics file for writing", "check logging.dir and its permissions");
    for (size_t c = 0; c < std::size(kCsvColumns); ++c) std::fprintf(csv_, "%s%s", c ? "," : "", kCsvColumns[c]);
    std::fprintf(csv_, "\n");
    for (const auto& l : kept) write_csv_row(nlohmann::json::parse(l));
  }
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
  if (csv_) std::fclose(csv_);
}

void MetricsLog::write(const nlohmann::json& record) {
  const std::string s = record.dump();
  std::fprintf(file_, "%s\n", s.c_str());
  std::fflush(file_);
  if (csv_) write_csv_row(record);
}

void MetricsLog::write_csv_row(const nlohmann::json& record) {
  for (size_t c = 0; c < std::size(kCsvColumns); ++c) {
    if (c) std::fputc(',', csv_);
    if (record.contains(kCsvColumns[c])) std::fprintf(csv_, "%s", record[kCsvColumns[c]].dump().c_str());
  }
  std::fputc('\n', csv_);
  std::fflush(csv_);
}

ConsoleProgress::ConsoleProgress(bool quiet) : quiet_(quiet), tty_(::isatty(STDOUT_FILENO) != 0) {}

ConsoleProgress::~ConsoleProgress() {
  if (live_shown_) std::printf("\n");
}

void ConsoleProgress::live(const std::string& status) {
  if (quiet_ || !tty_) return;
  std::printf("\r\033[K%s", status.c_str());
  std::fflush(stdout);
  live_shown_ = true;
}

void ConsoleProgress::line(const std::string& text) {
  if (quiet_) return;
  if (live_shown_) std::printf("\r\033[K");
  std::printf("%s\n", text.c_str());
  live_shown_ = false;
  std::fflush(stdout);
}

std::string human_count(double x) {
  const char* units[] = {"", "K", "M", "B", "T"};
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
