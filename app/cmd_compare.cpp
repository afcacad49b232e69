// `flexcp compare RUN... [--baseline RUN] [--out plot.png] [--max-delta X] ...`: loss curves of runs
// against a baseline, as a table (stdout), optional JSON, and a PNG + SVG plot. Exit code 3 when a
// gate (--max-delta, --max-mean-delta) fails, so CI can gate on it; 2 on bad input.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>

#include "app/command_registry.h"
#include "core/atomic_file.h"
#include "core/errors.h"
#include "core/metrics_compare.h"
#include "core/plot_gnuplot.h"

namespace flexcp {
namespace {

constexpr int kExitGateFailed = 3;

struct CompareArgs {
  std::vector<std::string> runs;
  std::string baseline;
  std::string out;
  std::string json;
  std::string window;
  CompareOptions options;
};

std::string canonical_or_same(const std::string& path) {
  std::error_code ec;
  auto p = std::filesystem::weakly_canonical(metrics_resolve_path(path), ec);
  return ec ? path : p.string();
}

PlotRequest plot_of(const CompareReport& report, const std::vector<const MetricsRun*>& runs) {
  PlotRequest req;
  const std::string base = report.rows.front().name;
  req.title = "flexcp compare: " + std::to_string(report.rows.size() - 1) + " run(s) against " + base;
  char beta[32];
  std::snprintf(beta, sizeof(beta), "%g", report.options.ema_beta);
  PlotPanel loss{"loss (faint: raw; solid: EMA, beta " + std::string(beta) + ")", "loss", {}, false};
  PlotPanel delta{"loss - " + base + " at shared steps (faint: raw; solid: smoothed)", "delta loss", {}, true};
  for (size_t i = 0; i < report.rows.size(); ++i) {
    const CompareRow& row = report.rows[i];
    PlotSeries raw, smooth;
    for (const auto& r : runs[i]->records) {
      if (!r.has_loss) continue;
      raw.x.push_back(static_cast<double>(r.step));
      raw.y.push_back(r.loss);
    }
    smooth.x = raw.x;
    smooth.y = ema_smooth(raw.y, report.options.ema_beta);
    raw.color = smooth.color = static_cast<int>(i) - 1;  // the baseline in black
    raw.faint = true;
    raw.width = 1.0;
    smooth.width = 2.0;
    smooth.title = row.name + (row.is_baseline ? " (baseline)" : "");
    loss.series.push_back(raw);
    loss.series.push_back(smooth);
    if (row.is_baseline) continue;
    PlotSeries draw, dsmooth;
    for (int64_t s : row.aligned.steps) draw.x.push_back(static_cast<double>(s));
    draw.y = row.aligned.delta;
    dsmooth.x = draw.x;
    dsmooth.y = row.aligned.delta_smoothed;
    draw.color = dsmooth.color = static_cast<int>(i) - 1;
    draw.faint = true;
    draw.width = 1.0;
    dsmooth.width = 2.0;
    dsmooth.title = row.name;
    delta.series.push_back(draw);
    delta.series.push_back(dsmooth);
  }
  req.panels = {loss, delta};
  return req;
}

void run_compare(const CompareArgs& a) {
  std::vector<std::string> paths = a.runs;
  std::string base_path = a.baseline;
  if (base_path.empty()) {
    if (paths.size() < 2) fail("compare", "needs two runs or more, or --baseline", "e.g. flexcp compare runs/cp1 runs/cp2");
    base_path = paths.front();
    paths.erase(paths.begin());
  } else {
    // The baseline may also be listed among the runs (a shell glob often catches it): compare it once.
    const std::string b = canonical_or_same(base_path);
    std::vector<std::string> rest;
    for (const auto& p : paths) {
      if (canonical_or_same(p) != b) rest.push_back(p);
    }
    paths = rest;
    if (paths.empty()) fail("compare", "nothing to compare with the baseline", "list at least one run besides --baseline");
  }
  if (!a.out.empty()) {
    // Fail on a bad --out before reading anything, not after the table.
    const auto parent = std::filesystem::path(plot_output_paths(a.out)[0]).parent_path();
    std::error_code ec;
    if (!parent.empty() && !std::filesystem::is_directory(parent, ec)) {
      fail("--out " + a.out, "the folder " + parent.string() + " does not exist", "create it first");
    }
  }
  CompareOptions options = a.options;
  if (!a.window.empty()) compare_parse_window(a.window, options);

  const MetricsRun baseline = metrics_load(base_path);
  std::vector<MetricsRun> runs;
  for (const auto& p : paths) runs.push_back(metrics_load(p));
  const CompareReport report = compare_runs(baseline, runs, options);

  std::cout << compare_table_text(report);
  if (!a.json.empty()) write_file_atomic(a.json, compare_report_json(report).dump(1) + "\n");
  if (!a.out.empty()) {
    std::vector<const MetricsRun*> ordered = {&baseline};
    for (const auto& r : runs) ordered.push_back(&r);
    const PlotOutcome plot = plot_gnuplot(plot_of(report, ordered), a.out);
    for (const auto& f : plot.written) std::cout << "plot: " << f << "\n";
    if (!plot.note.empty()) std::cerr << "note: " << plot.note << "; the table above is the complete comparison\n";
  }
  std::cout.flush();
  if (report.gated && !report.ok) command_exit_code() = kExitGateFailed;
}

void setup_compare(CLI::App& sub) {
  auto a = std::make_shared<CompareArgs>();
  sub.footer(
      "RUN is a run folder (logging.dir, holding metrics.jsonl) or a metrics.jsonl file. Without --baseline the\n"
      "first RUN is the baseline. Exit codes: 0 ok, 3 a --max-delta/--max-mean-delta gate failed, 2 bad input.\n"
      "Example: flexcp compare runs/llama3.2-1b-cp{1,2,4,8} --max-delta 0.05 --out runs/cp-compare.png\n");
  sub.add_option("runs", a->runs, "run folders or metrics.jsonl files")->required();
  sub.add_option("--baseline", a->baseline, "the run the others are compared with (default: the first RUN)");
  sub.add_option("--out", a->out, "also draw the curves and deltas: writes STEM.png and STEM.svg (needs gnuplot)")
      ->type_name("PLOT.png");
  sub.add_option("--json", a->json, "also write the numbers as JSON to this file (atomically)");
  sub.add_option("--ema", a->options.ema_beta, "smoothing: EMA weight of the history, in [0, 1); 0 = none")
      ->capture_default_str();
  auto* window = sub.add_option("--window", a->window, "compare only steps FIRST:LAST (inclusive; either end may be left out)")
                     ->type_name("FIRST:LAST");
  sub.add_option("--last", a->options.window_last_n, "compare only the last N steps each run shares with the baseline")
      ->type_name("N")
      ->check(CLI::PositiveNumber)
      ->excludes(window);
  sub.add_option("--max-delta", a->options.max_delta, "fail (exit 3) when any |loss - baseline| in the window exceeds X")
      ->type_name("X");
  sub.add_option("--max-mean-delta", a->options.max_mean_delta, "fail (exit 3) when the mean |loss - baseline| exceeds X")
      ->type_name("X");
  sub.add_flag("--gate-smoothed", a->options.gate_smoothed, "apply the limits to the smoothed curves instead of the raw ones");
  sub.callback([a] { run_compare(*a); });
}

CommandRegistration compare_reg("compare", "Compare the loss curves of runs against a baseline (table, plot, CI gate)",
                                 setup_compare);

}  // namespace
}  // namespace flexcp
