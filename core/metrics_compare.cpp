#include "core/metrics_compare.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/errors.h"

namespace flexcp {
namespace {

namespace fs = std::filesystem;

bool finite(double x) { return std::isfinite(x); }

// A known numeric field: absent -> keep NaN, null -> NaN (nlohmann writes NaN and inf as null),
// number -> value; anything else is a malformed line.
void read_number(const nlohmann::json& obj, const char* key, double& out, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return;
  if (!it->is_number()) {
    fail(where, std::string("'") + key + "' is " + it->dump() + ", not a number",
         "each metrics line holds numbers as flexcp train writes them");
  }
  out = it->get<double>();
}

std::string run_name_of(const std::string& file) {
  const fs::path p(file);
  if (p.filename() == "metrics.jsonl") {
    const fs::path parent = fs::absolute(p).lexically_normal().parent_path();
    const std::string name = parent.filename().string();
    return name.empty() ? "metrics" : name;
  }
  return p.stem().string();
}

std::string fmt(const char* format, double x) {
  if (!finite(x)) return std::isnan(x) ? "-" : (x > 0 ? "inf" : "-inf");
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, x);
  return buf;
}

std::string fmt_delta(double x) { return fmt("%.4g", x); }
std::string fmt_loss(double x) { return fmt("%.4f", x); }

std::string fmt_rate(double x) {
  if (!finite(x)) return "-";
  const char* units[] = {"", "k", "M", "G"};
  int u = 0;
  while (std::fabs(x) >= 1000.0 && u < 3) {
    x /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.2f%s" : "%.0f%s", x, units[u]);
  return buf;
}

// Indices of `steps` inside the window the options describe.
std::vector<size_t> window_indices(const std::vector<int64_t>& steps, const CompareOptions& o) {
  std::vector<size_t> idx;
  if (o.window_last_n > 0) {
    const size_t n = std::min<size_t>(steps.size(), static_cast<size_t>(o.window_last_n));
    for (size_t i = steps.size() - n; i < steps.size(); ++i) idx.push_back(i);
    return idx;
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    if (o.window_first > 0 && steps[i] < o.window_first) continue;
    if (o.window_last > 0 && steps[i] > o.window_last) continue;
    idx.push_back(i);
  }
  return idx;
}

// Median tokens/s and step time of the run's records with step in [first, last].
void speed_over(const MetricsRun& run, int64_t first, int64_t last, CompareRow& row) {
  std::vector<double> tps, ms;
  for (const auto& r : run.records) {
    if (r.step < first || r.step > last) continue;
    tps.push_back(r.tokens_per_s);
    ms.push_back(r.step_ms);
  }
  row.tokens_per_s = median_finite(tps);
  row.step_ms = median_finite(ms);
}

// Fields every row has, baseline or not: its own extent, final loss, non-finite count, validation.
void fill_own(const MetricsRun& run, double beta, CompareRow& row) {
  row.name = run.name;
  row.path = run.path;
  std::vector<double> loss;
  std::vector<int64_t> steps;
  for (const auto& r : run.records) {
    if (!r.has_loss) continue;
    loss.push_back(r.loss);
    steps.push_back(r.step);
    if (!finite(r.loss)) {
      if (row.nonfinite_losses++ == 0) row.first_nonfinite_step = r.step;
    }
  }
  if (!steps.empty()) {
    const auto smoothed = ema_smooth(loss, beta);
    row.first_step = steps.front();
    row.last_step = row.final_step = steps.back();
    row.final_loss = loss.back();
    row.final_smoothed = smoothed.back();
  }
  for (const auto& r : run.records) {
    if (!std::isnan(r.val_loss)) {
      row.last_val_loss = r.val_loss;
      row.last_val_step = r.step;
    }
  }
  for (const auto& n : run.notes) row.notes.push_back(n);
}

void check_options(const CompareOptions& o) {
  if (!(o.ema_beta >= 0.0 && o.ema_beta < 1.0)) {
    fail("--ema", "smoothing weight " + fmt("%g", o.ema_beta) + " is outside [0, 1)",
         "use e.g. --ema 0.9 (0 = no smoothing)");
  }
  if (o.window_first < 0 || o.window_last < 0) fail("--window", "steps must be positive", "write e.g. --window 100:2000");
  if (o.window_first > 0 && o.window_last > 0 && o.window_first > o.window_last) {
    fail("--window", "the range " + std::to_string(o.window_first) + ":" + std::to_string(o.window_last) + " is empty",
         "write FIRST:LAST with FIRST <= LAST");
  }
  if (o.window_last_n < 0) fail("--last", "must be a positive number of steps");
  if (o.window_last_n > 0 && (o.window_first > 0 || o.window_last > 0)) {
    fail("--last", "cannot be combined with --window", "choose one way to set the window");
  }
  if (o.max_delta < 0) fail("--max-delta", "must be >= 0");
  if (o.max_mean_delta < 0) fail("--max-mean-delta", "must be >= 0");
}

// The padded text table: every column as wide as its widest cell; text left, numbers right.
std::string render_table(const std::vector<std::vector<std::string>>& cells, size_t left_aligned_cols) {
  std::vector<size_t> width;
  for (const auto& row : cells) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::ostringstream out;
  for (const auto& row : cells) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      if (c) line += "  ";
      line += c < left_aligned_cols ? row[c] + pad : pad + row[c];
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
  return out.str();
}

nlohmann::json num(double x) { return finite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); }

}  // namespace

std::string metrics_resolve_path(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const fs::path file = fs::path(path) / "metrics.jsonl";
    if (!fs::is_regular_file(file, ec)) {
      fail(path, "this folder has no metrics.jsonl", "pass a run folder (the config's logging.dir) or a metrics file");
    }
    return file.string();
  }
  if (!fs::exists(path, ec)) fail(path, "no such file or folder", "pass a run folder (logging.dir) or its metrics.jsonl");
  return path;
}

MetricsRun metrics_load(const std::string& path) {
  const std::string file = metrics_resolve_path(path);
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file, "cannot be read", "check its permissions");
  std::ostringstream text;
  text << in.rdbuf();
  MetricsRun run = metrics_parse(text.str(), file);
  run.name = run_name_of(file);
  return run;
}

MetricsRun metrics_parse(const std::string& text, const std::string& where) {
  MetricsRun run;
  run.path = where;
  run.name = run_name_of(where);
  std::map<int64_t, nlohmann::json> by_step;
  int64_t repeated = 0;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const bool terminated = nl != std::string::npos;
    const std::string line = text.substr(pos, terminated ? nl - pos : std::string::npos);
    pos = terminated ? nl + 1 : text.size();
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string at = where + ":" + std::to_string(line_no);
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      // The trainer flushes whole lines; a last line without its newline is a write in progress or
      // a crash mid-line, not a malformed file.
      if (!terminated) {
        run.notes.push_back("ignored the incomplete last line " + std::to_string(line_no) + " (still being written?)");
        continue;
      }
      fail(at, "not valid JSON", "each line must be one JSON object, as flexcp train writes metrics.jsonl");
    }
    if (!j.is_object()) fail(at, "not a JSON object", "each line must be one JSON object with a \"step\"");
    auto st = j.find("step");
    if (st == j.end() || !st->is_number_integer()) {
      fail(at, "\"step\" is missing or not an integer", "each line must carry the optimizer step, e.g. {\"step\": 1, \"loss\": 11.9}");
    }
    const int64_t step = st->get<int64_t>();
    auto [it, inserted] = by_step.try_emplace(step, j);
    if (!inserted) {
      ++repeated;
      it->second.update(j);  // later keys win: a replayed step, or a separate validation line
    }
  }
  if (repeated > 0) {
    run.notes.push_back(std::to_string(repeated) + " line(s) repeat an earlier step; later values were kept");
  }
  for (const auto& [step, j] : by_step) {
    const std::string at = where + " step " + std::to_string(step);
    MetricsRecord r;
    r.step = step;
    r.has_loss = j.contains("loss");
    read_number(j, "loss", r.loss, at);
    read_number(j, "lr", r.lr, at);
    read_number(j, "grad_norm", r.grad_norm, at);
    read_number(j, "tokens", r.tokens, at);
    read_number(j, "tokens_per_s", r.tokens_per_s, at);
    read_number(j, "step_ms", r.step_ms, at);
    read_number(j, "mfu", r.mfu, at);
    read_number(j, "peak_mem_gib", r.peak_mem_gib, at);
    read_number(j, "val_loss", r.val_loss, at);
    run.records.push_back(r);
  }
  const bool any_loss = std::any_of(run.records.begin(), run.records.end(), [](const MetricsRecord& r) { return r.has_loss; });
  if (!any_loss) {
    fail(where, "no line carries a \"loss\"", "the run has not finished a step yet, or this is not a flexcp metrics file");
  }
  return run;
}

std::vector<double> ema_smooth(const std::vector<double>& x, double beta) {
  std::vector<double> out(x.size());
  double m = 0.0, beta_pow = 1.0;
  for (size_t t = 0; t < x.size(); ++t) {
    m = beta * m + (1.0 - beta) * x[t];
    beta_pow *= beta;
    out[t] = m / (1.0 - beta_pow);
  }
  return out;
}

double median_finite(std::vector<double> v) {
  v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return !std::isfinite(x); }), v.end());
  if (v.empty()) return kNoValue;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

AlignedLoss align_loss(const MetricsRun& baseline, const MetricsRun& run, double ema_beta) {
  struct Curve {
    std::vector<int64_t> steps;
    std::vector<double> loss, smoothed;
  };
  auto curve_of = [ema_beta](const MetricsRun& r) {
    Curve c;
    for (const auto& rec : r.records) {
      if (!rec.has_loss) continue;
      c.steps.push_back(rec.step);
      c.loss.push_back(rec.loss);
    }
    c.smoothed = ema_smooth(c.loss, ema_beta);
    return c;
  };
  const Curve b = curve_of(baseline), r = curve_of(run);
  AlignedLoss a;
  size_t i = 0, j = 0;
  while (i < b.steps.size() && j < r.steps.size()) {
    if (b.steps[i] < r.steps[j]) {
      ++i;
    } else if (r.steps[j] < b.steps[i]) {
      ++j;
    } else {
      a.steps.push_back(r.steps[j]);
      a.loss.push_back(r.loss[j]);
      a.smoothed.push_back(r.smoothed[j]);
      a.base_loss.push_back(b.loss[i]);
      a.base_smoothed.push_back(b.smoothed[i]);
      a.delta.push_back(r.loss[j] - b.loss[i]);
      a.delta_smoothed.push_back(r.smoothed[j] - b.smoothed[i]);
      ++i;
      ++j;
    }
  }
  return a;
}

CompareReport compare_runs(const MetricsRun& baseline, const std::vector<MetricsRun>& runs,
                           const CompareOptions& options) {
  check_options(options);
  CompareReport report;
  report.options = options;
  report.gated = !std::isnan(options.max_delta) || !std::isnan(options.max_mean_delta);

  // Names label table rows and plot legends, so two runs must not share one.
  std::set<std::string> used;
  auto unique_name = [&used](const std::string& name) {
    std::string n = name;
    for (int k = 2; used.count(n); ++k) n = name + "#" + std::to_string(k);
    used.insert(n);
    return n;
  };

  CompareRow base;
  fill_own(baseline, options.ema_beta, base);
  base.name = unique_name(base.name);
  base.is_baseline = true;
  {
    std::vector<int64_t> steps;
    for (const auto& r : baseline.records) steps.push_back(r.step);
    const auto idx = window_indices(steps, options);
    if (!idx.empty()) speed_over(baseline, steps[idx.front()], steps[idx.back()], base);
  }
  if (base.nonfinite_losses > 0) {
    base.notes.push_back(std::to_string(base.nonfinite_losses) + " non-finite loss(es), first at step " +
                         std::to_string(base.first_nonfinite_step));
  }
  report.rows.push_back(base);

  for (const auto& run : runs) {
    CompareRow row;
    fill_own(run, options.ema_beta, row);
    row.name = unique_name(row.name);
    row.aligned = align_loss(baseline, run, options.ema_beta);
    const AlignedLoss& a = row.aligned;
    const auto idx = window_indices(a.steps, options);
    row.steps_compared = static_cast<int64_t>(idx.size());
    int64_t first_bad_step = 0;
    if (!idx.empty()) {
      row.window_first = a.steps[idx.front()];
      row.window_last = a.steps[idx.back()];
      double sum = 0, sum_s = 0;
      int64_t n = 0, n_s = 0;
      for (size_t i : idx) {
        if (finite(a.delta[i])) {
          sum += std::fabs(a.delta[i]);
          ++n;
          if (!(std::fabs(a.delta[i]) <= row.max_abs_delta)) {  // also true while max is still NaN
            row.max_abs_delta = std::fabs(a.delta[i]);
            row.max_abs_delta_step = a.steps[i];
          }
        } else if (row.nonfinite_in_window++ == 0) {
          first_bad_step = a.steps[i];
        }
        if (finite(a.delta_smoothed[i])) {
          sum_s += std::fabs(a.delta_smoothed[i]);
          ++n_s;
          if (!(std::fabs(a.delta_smoothed[i]) <= row.max_abs_delta_smoothed)) {
            row.max_abs_delta_smoothed = std::fabs(a.delta_smoothed[i]);
            row.max_abs_delta_smoothed_step = a.steps[i];
          }
        }
      }
      if (n) row.mean_abs_delta = sum / n;
      if (n_s) row.mean_abs_delta_smoothed = sum_s / n_s;
      row.last_delta_smoothed = a.delta_smoothed[idx.back()];
      speed_over(run, row.window_first, row.window_last, row);
    }
    row.speed_vs_baseline = row.tokens_per_s / base.tokens_per_s;

    if (row.nonfinite_losses > 0) {
      row.notes.push_back(std::to_string(row.nonfinite_losses) + " non-finite loss(es), first at step " +
                          std::to_string(row.first_nonfinite_step));
    }
    if (idx.empty()) {
      row.notes.push_back(a.steps.empty() ? "no step in common with the baseline"
                                          : "no step in common with the baseline inside the window");
    } else if (row.window_last < base.last_step && options.window_last == 0 && options.window_last_n == 0) {
      row.notes.push_back("compared up to step " + std::to_string(row.window_last) + " only; the baseline goes to step " +
                          std::to_string(base.last_step));
    }

    if (report.gated) {
      const std::string which = options.gate_smoothed ? " (smoothed)" : "";
      const double max_d = options.gate_smoothed ? row.max_abs_delta_smoothed : row.max_abs_delta;
      const int64_t max_step = options.gate_smoothed ? row.max_abs_delta_smoothed_step : row.max_abs_delta_step;
      const double mean_d = options.gate_smoothed ? row.mean_abs_delta_smoothed : row.mean_abs_delta;
      if (idx.empty()) {
        row.within_limits = false;
        row.notes.push_back("FAIL: nothing to compare, so the limits cannot be met");
      }
      if (row.nonfinite_in_window > 0) {
        row.within_limits = false;
        row.notes.push_back("FAIL: loss (of this run or the baseline) not finite at " + std::to_string(row.nonfinite_in_window) +
                            " compared step(s), first at step " + std::to_string(first_bad_step));
      }
      if (!std::isnan(options.max_delta) && finite(max_d) && max_d > options.max_delta) {
        row.within_limits = false;
        row.notes.push_back("FAIL: max |delta loss|" + which + " " + fmt_delta(max_d) + " at step " + std::to_string(max_step) +
                            " exceeds --max-delta " + fmt("%g", options.max_delta));
      }
      if (!std::isnan(options.max_mean_delta) && finite(mean_d) && mean_d > options.max_mean_delta) {
        row.within_limits = false;
        row.notes.push_back("FAIL: mean |delta loss|" + which + " " + fmt_delta(mean_d) + " exceeds --max-mean-delta " +
                            fmt("%g", options.max_mean_delta));
      }
      if (!row.within_limits) report.ok = false;
    }
    report.rows.push_back(std::move(row));
  }
  return report;
}

std::string compare_table_text(const CompareReport& report) {
  const bool any_val = std::any_of(report.rows.begin(), report.rows.end(),
                                   [](const CompareRow& r) { return !std::isnan(r.last_val_loss); });
  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> head = {"run", "steps", "final loss", "smoothed", "compared", "mean|dL|", "max|dL|", "@step",
                                   "max|dL| sm", "dL sm last", "tokens/s", "vs base", "step ms"};
  if (any_val) head.push_back("val loss");
  cells.push_back(head);
  for (const auto& r : report.rows) {
    std::vector<std::string> c;
    c.push_back(r.name);
    c.push_back(r.first_step == r.last_step ? std::to_string(r.last_step)
                                             : std::to_string(r.first_step) + ".." + std::to_string(r.last_step));
    c.push_back(fmt_loss(r.final_loss));
    c.push_back(fmt_loss(r.final_smoothed));
    if (r.is_baseline) {
      for (const char* s : {"baseline", "", "", "", "", ""}) c.push_back(s);
    } else {
      c.push_back(r.steps_compared == 0 ? "0"
                                        : std::to_string(r.window_first) + ".." + std::to_string(r.window_last) + " (" +
                                              std::to_string(r.steps_compared) + ")");
      c.push_back(fmt_delta(r.mean_abs_delta));
      c.push_back(fmt_delta(r.max_abs_delta));
      c.push_back(r.max_abs_delta_step ? std::to_string(r.max_abs_delta_step) : "-");
      c.push_back(fmt_delta(r.max_abs_delta_smoothed));
      c.push_back(std::isnan(r.last_delta_smoothed) ? "-" : fmt("%+.4g", r.last_delta_smoothed));
    }
    c.push_back(fmt_rate(r.tokens_per_s));
    c.push_back(r.is_baseline ? "1.00x" : (finite(r.speed_vs_baseline) ? fmt("%.2fx", r.speed_vs_baseline) : "-"));
    c.push_back(fmt("%.1f", r.step_ms));
    if (any_val) c.push_back(std::isnan(r.last_val_loss) ? "-" : fmt_loss(r.last_val_loss) + " @" + std::to_string(r.last_val_step));
    cells.push_back(c);
  }
  std::ostringstream out;
  out << render_table(cells, 1);
  const auto& o = report.options;
  out << "dL = run - baseline at shared steps; sm = EMA-smoothed (beta " << fmt("%g", o.ema_beta) << ")";
  if (o.window_last_n > 0) out << "; window: last " << o.window_last_n << " shared steps";
  else if (o.window_first > 0 || o.window_last > 0) {
    out << "; window: steps " << (o.window_first > 0 ? std::to_string(o.window_first) : "") << ":"
        << (o.window_last > 0 ? std::to_string(o.window_last) : "");
  }
  out << "; tokens/s and step ms are medians over the window\n";
  bool header = false;
  for (const auto& r : report.rows) {
    for (const auto& n : r.notes) {
      if (!header) out << "notes:\n";
      header = true;
      out << "  " << r.name << ": " << n << "\n";
    }
  }
  if (report.gated) {
    std::string limits;
    if (!std::isnan(o.max_delta)) limits += "--max-delta " + fmt("%g", o.max_delta);
    if (!std::isnan(o.max_mean_delta)) limits += std::string(limits.empty() ? "" : ", ") + "--max-mean-delta " + fmt("%g", o.max_mean_delta);
    if (o.gate_smoothed) limits += " (smoothed)";
    const size_t n = report.rows.size() - 1;
    size_t bad = 0;
    for (const auto& r : report.rows) bad += r.within_limits ? 0 : 1;
    if (report.ok) out << "PASS: " << n << " run(s) within " << limits << " of " << report.rows.front().name << "\n";
    else out << "FAIL: " << bad << " of " << n << " run(s) outside " << limits << " of " << report.rows.front().name << "\n";
  }
  return out.str();
}

nlohmann::json compare_report_json(const CompareReport& report) {
  const auto& o = report.options;
  nlohmann::json j;
  j["baseline"] = report.rows.front().name;
  j["gated"] = report.gated;
  j["ok"] = report.ok;
  j["options"] = {{"ema_beta", o.ema_beta},
                  {"window_first", o.window_first},
                  {"window_last", o.window_last},
                  {"window_last_n", o.window_last_n},
                  {"max_delta", num(o.max_delta)},
                  {"max_mean_delta", num(o.max_mean_delta)},
                  {"gate_smoothed", o.gate_smoothed}};
  j["runs"] = nlohmann::json::array();
  for (const auto& r : report.rows) {
    nlohmann::json x = {{"name", r.name},
                        {"path", r.path},
                        {"baseline", r.is_baseline},
                        {"first_step", r.first_step},
                        {"last_step", r.last_step},
                        {"final_loss", num(r.final_loss)},
                        {"final_loss_smoothed", num(r.final_smoothed)},
                        {"nonfinite_losses", r.nonfinite_losses},
                        {"tokens_per_s", num(r.tokens_per_s)},
                        {"step_ms", num(r.step_ms)},
                        {"last_val_loss", num(r.last_val_loss)},
                        {"notes", r.notes}};
    if (!r.is_baseline) {
      x["within_limits"] = r.within_limits;
      x["window_first"] = r.window_first;
      x["window_last"] = r.window_last;
      x["steps_compared"] = r.steps_compared;
      x["nonfinite_in_window"] = r.nonfinite_in_window;
      x["mean_abs_delta"] = num(r.mean_abs_delta);
      x["max_abs_delta"] = num(r.max_abs_delta);
      x["max_abs_delta_step"] = r.max_abs_delta_step;
      x["mean_abs_delta_smoothed"] = num(r.mean_abs_delta_smoothed);
      x["max_abs_delta_smoothed"] = num(r.max_abs_delta_smoothed);
      x["max_abs_delta_smoothed_step"] = r.max_abs_delta_smoothed_step;
      x["last_delta_smoothed"] = num(r.last_delta_smoothed);
      x["speed_vs_baseline"] = num(r.speed_vs_baseline);
    }
    j["runs"].push_back(x);
  }
  return j;
}

void compare_parse_window(const std::string& text, CompareOptions& options) {
  const auto colon = text.find(':');
  const std::string fix = "write FIRST:LAST in steps, e.g. 100:2000, 100: or :500";
  if (colon == std::string::npos) fail("--window", "'" + text + "' has no ':'", fix);
  auto parse_end = [&](const std::string& s) -> int64_t {
    if (s.empty()) return 0;
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != s.size() || v < 1) fail("--window", "'" + s + "' is not a step number >= 1", fix);
    return v;
  };
  options.window_first = parse_end(text.substr(0, colon));
  options.window_last = parse_end(text.substr(colon + 1));
}

}  // namespace flexcp
