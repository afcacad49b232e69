// Per-step metrics: one JSON object per line in <run>/metrics.jsonl, flushed every line, plus a
// readable console line. On resume the file keeps the lines up to the resumed step, so a resumed
// run's log reads like an uninterrupted one.
#pragma once
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace flexcp {

class MetricsLog {
 public:
  // Opens `path` for appending, keeping the lines of the first `steps_done` steps ("step" is
  // 1-based) and dropping later ones, which the resumed run will write again.
  // With `csv`, metrics.csv beside it gets the same records (fixed columns, rebuilt from the kept lines).
  MetricsLog(const std::string& path, int64_t steps_done, bool csv = false);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const nlohmann::json& record);

 private:
  void write_csv_row(const nlohmann::json& record);
  std::FILE* file_ = nullptr;
  std::FILE* csv_ = nullptr;
};

// A terminal gets one live status line, redrawn each step, with permanent log lines scrolling
// above it; a pipe or file gets the permanent lines only. Quiet prints nothing.
class ConsoleProgress {
 public:
  explicit ConsoleProgress(bool quiet);
  ~ConsoleProgress();
  void live(const std::string& status);  // replaces the status line (terminals only)
  void line(const std::string& text);    // a permanent line
 private:
  bool quiet_ = false, tty_ = false, live_shown_ = false;
};

// "1.23K", "45.60M", "1.24B": for tokens/s, parameter and tensor counts in console lines.
std::string human_count(double x);
// "1h02m", "3m20s", "12s"
std::string human_duration(double seconds);

}  // namespace flexcp
