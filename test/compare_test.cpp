// `flexcp compare`: metrics reading (core/metrics_compare.*), step alignment, deltas over a window,
// EMA smoothing, the --max-delta gate and its exit code, and the gnuplot plot (core/plot_gnuplot.*).
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/errors.h"
#include "core/metrics_compare.h"
#include "core/plot_gnuplot.h"
#include "test/test_util.h"

namespace fs = std::filesystem;
using namespace flexcp;
using namespace flexcp::test;

namespace {

// A metrics.jsonl as flexcp train writes it, from step -> loss (and a constant speed).
std::string metrics_text(const std::vector<std::pair<int64_t, double>>& losses, double tokens_per_s = 1000.0) {
  std::string out;
  for (const auto& [step, loss] : losses) {
    nlohmann::json j = {{"step", step}, {"loss", loss}, {"lr", 1e-4}, {"grad_norm", 1.0}, {"tokens", step * 4096},
                        {"tokens_per_s", tokens_per_s}, {"step_ms", 4096.0 / tokens_per_s * 1000}, {"mfu", 0.3},
                        {"peak_mem_gib", 1.5}};
    out += j.dump() + "\n";
  }
  return out;
}

MetricsRun run_of(const std::string& name, const std::vector<std::pair<int64_t, double>>& losses, double tps = 1000.0) {
  MetricsRun r = metrics_parse(metrics_text(losses, tps), name + "/metrics.jsonl");
  return r;
}

std::vector<std::pair<int64_t, double>> curve(int64_t first, int64_t last, const std::function<double(int64_t)>& f) {
  std::vector<std::pair<int64_t, double>> v;
  for (int64_t s = first; s <= last; ++s) v.emplace_back(s, f(s));
  return v;
}

double base_loss(int64_t s) { return 10.0 / (1.0 + 0.05 * s) + 2.0 + 0.1 * std::sin(0.7 * s); }

}  // namespace

TEST_CASE("metrics_parse reads flexcp metrics lines and merges repeated steps in step order", "[compare]") {
  const std::string text =
      "{\"step\": 2, \"loss\": 5.5, \"tokens_per_s\": 100.0}\n"
      "\n"
      "{\"step\": 1, \"loss\": 6.0, \"lr\": 0.001, \"step_ms\": 12.5}\n"
      "{\"step\": 2, \"val_loss\": 5.9}\n"  // a separate validation line for step 2
      "{\"step\": 3, \"loss\": null}\n";    // nlohmann writes a NaN loss as null
  const MetricsRun r = metrics_parse(text, "runs/a/metrics.jsonl");
  CHECK(r.name == "a");
  REQUIRE(r.records.size() == 3);
  CHECK(r.records[0].step == 1);
  CHECK(r.records[0].loss == 6.0);
  CHECK(r.records[0].lr == 0.001);
  CHECK(r.records[0].step_ms == 12.5);
  CHECK(std::isnan(r.records[0].tokens_per_s));
  CHECK(r.records[1].step == 2);
  CHECK(r.records[1].loss == 5.5);           // kept from the first line of step 2
  CHECK(r.records[1].tokens_per_s == 100.0);
  CHECK(r.records[1].val_loss == 5.9);       // added by the second
  CHECK(r.records[2].has_loss);
  CHECK(std::isnan(r.records[2].loss));
  REQUIRE(r.notes.size() == 1);
  CHECK(r.notes[0].find("repeat") != std::string::npos);

  // A later line for the same step overrides the same key (a replayed step).
  const MetricsRun replay = metrics_parse("{\"step\":1,\"loss\":3}\n{\"step\":1,\"loss\":2}\n", "m.jsonl");
  REQUIRE(replay.records.size() == 1);
  CHECK(replay.records[0].loss == 2.0);
  CHECK(replay.name == "m");
}

TEST_CASE("metrics_parse tolerates a torn last line and rejects malformed input naming file and line", "[compare]") {
  const MetricsRun torn = metrics_parse("{\"step\":1,\"loss\":3}\n{\"step\":2,\"lo", "m.jsonl");
  CHECK(torn.records.size() == 1);
  REQUIRE(torn.notes.size() == 1);
  CHECK(torn.notes[0].find("incomplete last line 2") != std::string::npos);

  std::string msg = user_error_of([] { metrics_parse("{\"step\":1,\"loss\":3}\n{\"step\":2,\"lo\n{\"step\":3,\"loss\":1}\n", "m.jsonl"); });
  CHECK(msg.find("m.jsonl:2") != std::string::npos);
  CHECK(msg.find('\n') == std::string::npos);
  msg = user_error_of([] { metrics_parse("{\"loss\":3}\n", "m.jsonl"); });
  CHECK(msg.find("m.jsonl:1") != std::string::npos);
  CHECK(msg.find("step") != std::string::npos);
  msg = user_error_of([] { metrics_parse("{\"step\":1.5,\"loss\":3}\n", "m.jsonl"); });
  CHECK(msg.find("step") != std::string::npos);
  msg = user_error_of([] { metrics_parse("[1,2]\n", "m.jsonl"); });
  CHECK(msg.find("not a JSON object") != std::string::npos);
  msg = user_error_of([] { metrics_parse("{\"step\":1,\"loss\":\"low\"}\n", "m.jsonl"); });
  CHECK(msg.find("'loss'") != std::string::npos);
  msg = user_error_of([] { metrics_parse("{\"step\":1,\"val_loss\":3}\n", "m.jsonl"); });
  CHECK(msg.find("no line carries") != std::string::npos);
  msg = user_error_of([] { metrics_parse("", "empty.jsonl"); });
  CHECK(msg.find("empty.jsonl") != std::string::npos);
}

TEST_CASE("metrics_load accepts a run folder or a file and names the run after its folder", "[compare]") {
  TempDir tmp;
  write_text(tmp.path / "cp2" / "metrics.jsonl", metrics_text({{1, 4.0}, {2, 3.5}}));
  const MetricsRun a = metrics_load((tmp.path / "cp2").string());
  CHECK(a.name == "cp2");
  CHECK(a.records.size() == 2);
  const MetricsRun b = metrics_load((tmp.path / "cp2" / "metrics.jsonl").string());
  CHECK(b.name == "cp2");
  write_text(tmp.path / "other.jsonl", metrics_text({{1, 4.0}}));
  CHECK(metrics_load((tmp.path / "other.jsonl").string()).name == "other");
  fs::create_directories(tmp.path / "empty");
  CHECK(user_error_of([&] { metrics_load((tmp.path / "empty").string()); }).find("no metrics.jsonl") != std::string::npos);
  CHECK(user_error_of([&] { metrics_load((tmp.path / "nope").string()); }).find("no such file") != std::string::npos);
}

TEST_CASE("ema_smooth is the bias-corrected weighted mean of the history", "[compare]") {
  // Reference: s_t = sum_k beta^(t-k) x_k / sum_k beta^(t-k), computed directly.
  std::vector<double> x;
  for (int i = 0; i < 40; ++i) x.push_back(std::cos(0.3 * i) + 0.01 * i * i);
  for (double beta : {0.0, 0.5, 0.9, 0.99}) {
    const auto s = ema_smooth(x, beta);
    REQUIRE(s.size() == x.size());
    for (size_t t = 0; t < x.size(); ++t) {
      double num = 0, den = 0;
      for (size_t k = 0; k <= t; ++k) {
        const double w = std::pow(beta, static_cast<double>(t - k));
        num += w * x[k];
        den += w;
      }
      CHECK(s[t] == Approx(num / den).epsilon(1e-12));
    }
  }
  CHECK(ema_smooth({1.0, 2.0}, 0.5)[1] == Approx(5.0 / 3.0));
  const auto c = ema_smooth(std::vector<double>(10, 3.25), 0.9);  // no pull towards 0 at the start
  for (double v : c) CHECK(v == Approx(3.25).epsilon(1e-12));
  const auto nan = ema_smooth({1.0, NAN, 1.0, 1.0}, 0.9);
  CHECK(std::isfinite(nan[0]));
  CHECK(std::isnan(nan[3]));  // a diverged run stays visibly diverged
}

TEST_CASE("align_loss pairs the runs at the steps both logged", "[compare]") {
  const MetricsRun base = run_of("base", curve(1, 10, base_loss));
  std::vector<std::pair<int64_t, double>> odd;
  for (int64_t s : {2, 4, 8, 10, 12}) odd.emplace_back(s, base_loss(s) + 0.25);
  const MetricsRun run = run_of("run", odd);
  const AlignedLoss a = align_loss(base, run, 0.0);
  REQUIRE(a.steps == std::vector<int64_t>{2, 4, 8, 10});
  for (size_t i = 0; i < a.steps.size(); ++i) {
    CHECK(a.base_loss[i] == base_loss(a.steps[i]));
    CHECK(a.loss[i] == base_loss(a.steps[i]) + 0.25);
    CHECK(a.delta[i] == Approx(0.25).epsilon(1e-12));
    CHECK(a.delta_smoothed[i] == Approx(0.25).epsilon(1e-12));  // beta 0: smoothing is the identity
  }
  // Smoothing follows each run's own history: the baseline's smoothed value at step 2 averages steps 1-2.
  const AlignedLoss s = align_loss(base, run, 0.5);
  const double b1 = base_loss(1), b2 = base_loss(2);
  CHECK(s.base_smoothed[0] == Approx((0.5 * b1 + b2) / 1.5));
  CHECK(s.smoothed[0] == Approx(base_loss(2) + 0.25));  // the run's first point
}

TEST_CASE("compare_runs measures deltas over the window and gates on max-delta", "[compare]") {
  // run = baseline + 0.001 * step on steps 1..100, so |delta| grows linearly and its max is at the end.
  const MetricsRun base = run_of("base", curve(1, 100, base_loss), 1000.0);
  const MetricsRun drift = run_of("drift", curve(1, 100, [](int64_t s) { return base_loss(s) + 0.001 * s; }), 1500.0);
  const MetricsRun same = run_of("same", curve(1, 100, base_loss), 500.0);

  CompareOptions o;
  o.ema_beta = 0.0;
  CompareReport r = compare_runs(base, {drift, same}, o);
  REQUIRE(r.rows.size() == 3);
  CHECK(r.rows[0].is_baseline);
  CHECK(r.rows[0].name == "base");
  const CompareRow& d = r.rows[1];
  CHECK(d.steps_compared == 100);
  CHECK(d.window_first == 1);
  CHECK(d.window_last == 100);
  CHECK(d.mean_abs_delta == Approx(0.001 * 50.5));
  CHECK(d.max_abs_delta == Approx(0.1));
  CHECK(d.max_abs_delta_step == 100);
  CHECK(d.last_delta_smoothed == Approx(0.1));
  CHECK(d.final_loss == base_loss(100) + 0.1);
  CHECK(d.final_step == 100);
  CHECK(d.tokens_per_s == 1500.0);
  CHECK(d.speed_vs_baseline == Approx(1.5));
  CHECK(r.rows[2].max_abs_delta == 0.0);
  CHECK(r.rows[2].speed_vs_baseline == Approx(0.5));
  CHECK_FALSE(r.gated);
  CHECK(r.ok);

  SECTION("a window limits the steps") {
    compare_parse_window("11:20", o);
    r = compare_runs(base, {drift}, o);
    CHECK(r.rows[1].steps_compared == 10);
    CHECK(r.rows[1].window_first == 11);
    CHECK(r.rows[1].mean_abs_delta == Approx(0.001 * 15.5));
    CHECK(r.rows[1].max_abs_delta == Approx(0.02));
    CHECK(r.rows[1].max_abs_delta_step == 20);
  }
  SECTION("--last N takes the last N shared steps") {
    o.window_last_n = 4;
    r = compare_runs(base, {drift}, o);
    CHECK(r.rows[1].steps_compared == 4);
    CHECK(r.rows[1].window_first == 97);
    CHECK(r.rows[1].mean_abs_delta == Approx(0.001 * 98.5));
  }
  SECTION("the gate passes at the limit and fails above it") {
    o.max_delta = 0.1 + 1e-9;
    r = compare_runs(base, {drift, same}, o);
    CHECK(r.gated);
    CHECK(r.ok);
    o.max_delta = 0.099;
    r = compare_runs(base, {drift, same}, o);
    CHECK_FALSE(r.ok);
    CHECK_FALSE(r.rows[1].within_limits);
    CHECK(r.rows[2].within_limits);
    const std::string table = compare_table_text(r);
    CHECK(table.find("FAIL: 1 of 2") != std::string::npos);
    CHECK(table.find("at step 100 exceeds --max-delta 0.099") != std::string::npos);
    const auto j = compare_report_json(r);
    CHECK(j["ok"] == false);
    CHECK(j["runs"][1]["within_limits"] == false);
    CHECK(j["runs"][1]["max_abs_delta"].get<double>() == Approx(0.1));
  }
  SECTION("--max-mean-delta gates the mean") {
    o.max_mean_delta = 0.05;
    r = compare_runs(base, {drift}, o);
    CHECK_FALSE(r.ok);
    o.max_mean_delta = 0.051;
    r = compare_runs(base, {drift}, o);
    CHECK(r.ok);
  }
}

TEST_CASE("smoothed gating ignores step noise that raw gating catches", "[compare]") {
  // Alternating +-0.2 noise on every step: raw max |delta| 0.2, smoothed (beta 0.9) about 0.01.
  const MetricsRun base = run_of("base", curve(1, 200, base_loss));
  const MetricsRun noisy = run_of("noisy", curve(1, 200, [](int64_t s) { return base_loss(s) + (s % 2 ? 0.2 : -0.2); }));
  CompareOptions o;
  o.ema_beta = 0.9;
  o.max_delta = 0.1;
  CompareReport raw = compare_runs(base, {noisy}, o);
  CHECK(raw.rows[1].max_abs_delta == Approx(0.2));
  CHECK_FALSE(raw.ok);
  o.gate_smoothed = true;
  o.window_first = 150;  // the first smoothed points have little history: they are still close to raw
  CompareReport smooth = compare_runs(base, {noisy}, o);
  // Alternating +-a under an EMA settles to +-a (1 - beta) / (1 + beta).
  CHECK(smooth.rows[1].max_abs_delta_smoothed == Approx(0.2 * 0.1 / 1.9).epsilon(1e-3));
  CHECK(smooth.ok);
}

TEST_CASE("non-finite losses and missing overlap fail a gate and are reported", "[compare]") {
  const MetricsRun base = run_of("base", curve(1, 20, base_loss));
  auto losses = curve(1, 20, base_loss);
  losses[9].second = NAN;  // step 10
  const MetricsRun diverged = metrics_parse(metrics_text(losses), "diverged/metrics.jsonl");
  REQUIRE(diverged.records[9].has_loss);
  REQUIRE(std::isnan(diverged.records[9].loss));
  const MetricsRun later = run_of("later", curve(30, 40, base_loss));

  CompareOptions o;
  CompareReport r = compare_runs(base, {diverged, later}, o);
  CHECK(r.ok);  // no gate: reported, not failed
  CHECK(r.rows[1].nonfinite_losses == 1);
  CHECK(r.rows[1].first_nonfinite_step == 10);
  CHECK(r.rows[1].nonfinite_in_window == 1);
  CHECK(r.rows[1].max_abs_delta == 0.0);  // over the finite steps
  CHECK(r.rows[2].steps_compared == 0);
  CHECK(std::isnan(r.rows[2].mean_abs_delta));

  o.max_delta = 1.0;
  r = compare_runs(base, {diverged, later}, o);
  CHECK_FALSE(r.ok);
  CHECK_FALSE(r.rows[1].within_limits);
  CHECK_FALSE(r.rows[2].within_limits);
  const std::string table = compare_table_text(r);
  CHECK(table.find("not finite at 1 compared step(s), first at step 10") != std::string::npos);
  CHECK(table.find("no step in common") != std::string::npos);
}

TEST_CASE("compare_runs rejects bad options and names runs uniquely", "[compare]") {
  const MetricsRun a = run_of("x", curve(1, 5, base_loss));
  CompareOptions o;
  o.ema_beta = 1.0;
  CHECK(user_error_of([&] { compare_runs(a, {a}, o); }).find("--ema") != std::string::npos);
  o = {};
  o.window_first = 10;
  o.window_last = 5;
  CHECK(user_error_of([&] { compare_runs(a, {a}, o); }).find("empty") != std::string::npos);
  o = {};
  o.max_delta = -1;
  CHECK(user_error_of([&] { compare_runs(a, {a}, o); }).find("--max-delta") != std::string::npos);
  CHECK(user_error_of([&] { compare_parse_window("10", o); }).find("--window") != std::string::npos);
  CHECK(user_error_of([&] { compare_parse_window("a:5", o); }).find("'a'") != std::string::npos);
  compare_parse_window(":50", o);
  CHECK(o.window_first == 0);
  CHECK(o.window_last == 50);
  const CompareReport r = compare_runs(a, {a, a}, {});
  CHECK(r.rows[0].name == "x");
  CHECK(r.rows[1].name == "x#2");
  CHECK(r.rows[2].name == "x#3");
}

TEST_CASE("plot_gnuplot writes a PNG and an SVG or says why not", "[compare]") {
  CHECK(plot_output_paths("a/loss.png") == std::vector<std::string>{"a/loss.png", "a/loss.svg"});
  CHECK(plot_output_paths("a/loss.svg") == std::vector<std::string>{"a/loss.png", "a/loss.svg"});
  CHECK(plot_output_paths("loss") == std::vector<std::string>{"loss.png", "loss.svg"});

  PlotRequest req;
  req.title = "it's a test";  // a quote must survive gnuplot's string syntax
  PlotSeries s;
  s.title = "run_1";
  for (int i = 1; i <= 50; ++i) {
    s.x.push_back(i);
    s.y.push_back(i == 25 ? NAN : 1.0 / i);
  }
  req.panels.push_back({"loss", "loss", {s}, false});
  req.panels.push_back({"empty panel", "d", {PlotSeries{}}, true});  // no points: left out, not an error
  const std::string script = plot_gnuplot_script(req, "/d", "/o.png", "/o.svg");
  CHECK(script.find("'it''s a test'") != std::string::npos);
  CHECK(script.find("layout 1,1") != std::string::npos);

  TempDir tmp;
  const std::string gnuplot = gnuplot_find();
  if (gnuplot.empty()) {
    WARN("gnuplot not installed: only the degraded path is tested");
  } else {
    const PlotOutcome o = plot_gnuplot(req, (tmp.path / "p.png").string());
    INFO(o.note);
    CHECK(o.note.empty());
    REQUIRE(o.written.size() == 2);
    const std::string png = read_text(tmp.path / "p.png");
    REQUIRE(png.size() > 8);
    CHECK(png.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
    CHECK(read_text(tmp.path / "p.svg").find("<svg") != std::string::npos);
    CHECK_FALSE(fs::exists(tmp.path / "p.png.tmp"));
  }
  // No gnuplot: a one-line note and no files, never an exception.
  ::setenv("FLEXCP_GNUPLOT", (tmp.path / "no-such-gnuplot").c_str(), 1);
  const PlotOutcome none = plot_gnuplot(req, (tmp.path / "q.png").string());
  ::unsetenv("FLEXCP_GNUPLOT");
  CHECK(none.written.empty());
  CHECK(none.note.find("FLEXCP_GNUPLOT") != std::string::npos);
  CHECK_FALSE(fs::exists(tmp.path / "q.png"));
  // A failing gnuplot (here: `false`) is a note too.
  ::setenv("FLEXCP_GNUPLOT", "false", 1);
  const PlotOutcome broken = plot_gnuplot(req, (tmp.path / "r.png").string());
  ::unsetenv("FLEXCP_GNUPLOT");
  CHECK(broken.written.empty());
  CHECK(broken.note.find("failed") != std::string::npos);
  CHECK(user_error_of([&] { plot_gnuplot(req, (tmp.path / "missing" / "p.png").string()); }).find("does not exist") !=
        std::string::npos);
}

TEST_CASE("flexcp compare CLI prints the table and JSON and the plot and exits 3 when the gate fails", "[compare][cli]") {
  TempDir tmp;
  const fs::path a = tmp.path / "cp1", b = tmp.path / "cp2", c = tmp.path / "cp8";
  write_text(a / "metrics.jsonl", metrics_text(curve(1, 60, base_loss), 1000));
  write_text(b / "metrics.jsonl", metrics_text(curve(1, 60, [](int64_t s) { return base_loss(s) + 0.001; }), 1100));
  write_text(c / "metrics.jsonl", metrics_text(curve(1, 60, [](int64_t s) { return base_loss(s) + (s > 40 ? 0.3 : 0.0); }), 900));
  const std::string runs = "'" + a.string() + "' '" + b.string() + "' '" + c.string() + "'";

  CliRun ok = cli_run("compare " + runs + " --max-delta 0.5", tmp.path);
  INFO(ok.out << ok.err);
  CHECK(ok.rc == 0);
  CHECK(ok.out.find("cp1") != std::string::npos);
  CHECK(ok.out.find("baseline") != std::string::npos);
  CHECK(ok.out.find("PASS: 2 run(s)") != std::string::npos);

  CliRun gate = cli_run("compare " + runs + " --max-delta 0.01 --json '" + (tmp.path / "r.json").string() + "'", tmp.path);
  INFO(gate.out << gate.err);
  CHECK(gate.rc == 3);
  CHECK(gate.out.find("cp8: FAIL: max |delta loss| 0.3 at step 41") != std::string::npos);
  const auto j = nlohmann::json::parse(read_text(tmp.path / "r.json"));
  CHECK(j["ok"] == false);
  CHECK(j["runs"][1]["within_limits"] == true);
  CHECK(j["runs"][2]["within_limits"] == false);

  // The early window holds no difference: the same runs pass.
  CHECK(cli_run("compare " + runs + " --max-delta 0.01 --window :40", tmp.path).rc == 0);
  // --baseline also listed among the runs is compared once, not with itself.
  CliRun based = cli_run("compare " + runs + " --baseline '" + c.string() + "'", tmp.path);
  CHECK(based.rc == 0);
  CHECK(based.out.find("cp8#2") == std::string::npos);

  CliRun bad = cli_run("compare '" + a.string() + "' '" + (tmp.path / "nope").string() + "'", tmp.path);
  CHECK(bad.rc == 2);
  CHECK(bad.err.find("no such file") != std::string::npos);
  CHECK(cli_run("compare '" + a.string() + "'", tmp.path).rc == 2);  // nothing to compare with

  CliRun noplot = cli_run("compare " + runs + " --out '" + (tmp.path / "x.png").string() + "'", tmp.path, "FLEXCP_GNUPLOT=");
  CHECK(noplot.rc == 0);
  CHECK(noplot.err.find("no plot") != std::string::npos);
  CHECK(noplot.out.find("cp8") != std::string::npos);  // the table is still there
  CHECK_FALSE(fs::exists(tmp.path / "x.png"));

  if (!gnuplot_find().empty()) {
    CliRun plot = cli_run("compare " + runs + " --out '" + (tmp.path / "y.png").string() + "'", tmp.path);
    INFO(plot.err);
    CHECK(plot.rc == 0);
    CHECK(fs::file_size(tmp.path / "y.png") > 1000);
    CHECK(fs::file_size(tmp.path / "y.svg") > 1000);
  }
}
