// Loss-curve comparison of training runs (`flexcp compare`): read metrics.jsonl files, line the runs
// up by step against a baseline, and measure how far their losses drift from it. Pure logic (no
// printing, no plotting), so tests can check every number.
//
// Conventions:
//  - delta = run - baseline, at a step both runs logged; steps only one run has are left out.
//  - Smoothed curves are a debiased exponential moving average over each run's own history (what
//    TensorBoard's smoothing slider does), so the smoothed value at step s depends on steps <= s only.
//  - A loss that is NaN or infinite (JSON writes it as null) is never averaged away: it is counted,
//    reported, and fails any --max-delta gate.
#pragma once
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace flexcp {

constexpr double kNoValue = std::numeric_limits<double>::quiet_NaN();

// One step of metrics.jsonl (lines with the same step are merged, later keys winning, so a replayed
// step after a resume or a separate validation line both read as one record). Absent values are NaN.
struct MetricsRecord {
  int64_t step = 0;
  bool has_loss = false;  // the line carried "loss" (possibly null = non-finite)
  double loss = kNoValue;
  double lr = kNoValue;
  double grad_norm = kNoValue;
  double tokens = kNoValue;
  double tokens_per_s = kNoValue;
  double step_ms = kNoValue;
  double mfu = kNoValue;
  double peak_mem_gib = kNoValue;
  double val_loss = kNoValue;
};

struct MetricsRun {
  std::string name;  // for tables and legends: the run folder's name, or the file name's stem
  std::string path;  // the metrics file read
  std::vector<MetricsRecord> records;  // ascending step, one per step
  std::vector<std::string> notes;      // what the reader tolerated (a torn last line, repeated steps)
};

// A metrics file, or a run folder holding metrics.jsonl -> the file to read. Throws UserError when
// neither exists.
std::string metrics_resolve_path(const std::string& path);
// Reads a metrics file or run folder. Throws UserError naming the file and line on malformed input
// and when no line carries a loss.
MetricsRun metrics_load(const std::string& path);
// The same from text already in memory; `where` names it in messages and becomes `path`.
MetricsRun metrics_parse(const std::string& text, const std::string& where);

// Debiased EMA: m_t = beta m_{t-1} + (1 - beta) x_t with m_0 = 0, reported as m_t / (1 - beta^t).
// beta = 0 returns x unchanged. A non-finite x makes every later value non-finite (a diverged run
// stays visibly diverged).
std::vector<double> ema_smooth(const std::vector<double>& x, double beta);

// Median of the finite values; NaN when there is none.
double median_finite(std::vector<double> v);

// A run and the baseline at the steps both logged a loss (ascending).
struct AlignedLoss {
  std::vector<int64_t> steps;
  std::vector<double> loss, smoothed;            // the run
  std::vector<double> base_loss, base_smoothed;  // the baseline
  std::vector<double> delta, delta_smoothed;     // run - baseline
};
AlignedLoss align_loss(const MetricsRun& baseline, const MetricsRun& run, double ema_beta);

struct CompareOptions {
  double ema_beta = 0.9;           // smoothing: weight of the history, in [0, 1)
  int64_t window_first = 0;        // inclusive step range of the deltas and the tokens/s median;
  int64_t window_last = 0;         // 0 = open end
  int64_t window_last_n = 0;       // > 0: instead, the last N steps the run shares with the baseline
  double max_delta = kNoValue;       // gate: max |delta| over the window (NaN = no gate)
  double max_mean_delta = kNoValue;  // gate: mean |delta| over the window (NaN = no gate)
  bool gate_smoothed = false;        // gates read the smoothed deltas instead of the raw ones
};

struct CompareRow {
  std::string name;
  std::string path;
  bool is_baseline = false;
  int64_t first_step = 0, last_step = 0;  // of the run's loss records
  int64_t final_step = 0;
  double final_loss = kNoValue;      // at the run's last step
  double final_smoothed = kNoValue;
  int64_t nonfinite_losses = 0;      // over the whole run
  int64_t first_nonfinite_step = 0;
  // Over the window, at steps shared with the baseline (not filled for the baseline row):
  int64_t window_first = 0, window_last = 0;  // the steps actually compared
  int64_t steps_compared = 0;
  int64_t nonfinite_in_window = 0;   // steps where either loss or its delta is not finite
  double mean_abs_delta = kNoValue, max_abs_delta = kNoValue;
  int64_t max_abs_delta_step = 0;
  double mean_abs_delta_smoothed = kNoValue, max_abs_delta_smoothed = kNoValue;
  int64_t max_abs_delta_smoothed_step = 0;
  double last_delta_smoothed = kNoValue;  // signed, at the last compared step
  // Speed over the window (the baseline row uses its own steps in the window):
  double tokens_per_s = kNoValue;  // median
  double step_ms = kNoValue;       // median
  double speed_vs_baseline = kNoValue;  // tokens_per_s / baseline's
  double last_val_loss = kNoValue;
  int64_t last_val_step = 0;
  bool within_limits = true;       // false only when a gate is set and this run fails it
  std::vector<std::string> notes;  // one line each: why a gate failed, what is missing
  AlignedLoss aligned;             // full curves at the shared steps (for plots)
};

struct CompareReport {
  CompareOptions options;
  std::vector<CompareRow> rows;  // baseline first, then the runs in the order given
  bool gated = false;            // a --max-delta or --max-mean-delta was set
  bool ok = true;                // every run within the limits (always true when not gated)
};

// Compares `runs` with `baseline`. Throws UserError on unusable options (beta outside [0, 1), an
// empty window range, a negative limit).
CompareReport compare_runs(const MetricsRun& baseline, const std::vector<MetricsRun>& runs,
                           const CompareOptions& options);

// Fixed-width text table, one row per run, then the notes and (when gated) the verdict.
std::string compare_table_text(const CompareReport& report);
// The same numbers for machines: {"baseline": .., "ok": .., "runs": [{...}, ...]}; NaN -> null.
nlohmann::json compare_report_json(const CompareReport& report);

// "A:B", "A:", ":B" (inclusive steps, either end open) -> window_first/window_last. Throws UserError.
void compare_parse_window(const std::string& text, CompareOptions& options);

}  // namespace flexcp
