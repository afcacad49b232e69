#include "core/plot_gnuplot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/atomic_file.h"
#include "core/errors.h"

extern char** environ;

namespace flexcp {
namespace {

namespace fs = std::filesystem;

// Matplotlib's "tab10": distinct, readable on white, and familiar from other training dashboards.
const char* const kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

std::string colour_of(int index, bool faint) {
  const std::string hex = index < 0 ? "#000000" : kPalette[index % 10];
  if (!faint) return hex;
  // Mixed with white rather than drawn with alpha: every terminal (gd png included) can show it.
  char out[8];
  unsigned rgb = static_cast<unsigned>(std::stoul(hex.substr(1), nullptr, 16));
  unsigned c[3] = {(rgb >> 16) & 255u, (rgb >> 8) & 255u, rgb & 255u};
  for (auto& v : c) v = static_cast<unsigned>(std::lround(0.35 * v + 0.65 * 255));
  std::snprintf(out, sizeof(out), "#%02x%02x%02x", c[0], c[1], c[2]);
  return out;
}

// gnuplot single-quoted string: no escapes are processed except '' for a quote.
std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char ch : s) {
    if (ch == '\'') out += "''";
    else if (ch == '\n') out += ' ';
    else out += ch;
  }
  return out + "'";
}

bool has_points(const PlotSeries& s) {
  for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
    if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) return true;
  }
  return false;
}

std::string data_file(const std::string& dir, size_t panel, size_t series) {
  return dir + "/s" + std::to_string(panel) + "_" + std::to_string(series) + ".dat";
}

// x y per line; a blank line where the curve has a gap, so gnuplot breaks the line there.
std::string data_text(const PlotSeries& s) {
  std::string out;
  bool gap = false;
  char buf[64];
  for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
    if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
      gap = true;
      continue;
    }
    if (gap && !out.empty()) out += "\n";
    gap = false;
    std::snprintf(buf, sizeof(buf), "%.17g %.17g\n", s.x[i], s.y[i]);
    out += buf;
  }
  return out;
}

std::string draw_commands(const PlotRequest& req, const std::string& data_dir) {
  std::vector<size_t> panels;
  for (size_t p = 0; p < req.panels.size(); ++p) {
    for (const auto& s : req.panels[p].series) {
      if (has_points(s)) {
        panels.push_back(p);
        break;
      }
    }
  }
  std::ostringstream g;
  g << "set multiplot layout " << panels.size() << ",1 title " << quoted(req.title) << "\n";
  for (size_t p : panels) {
    const PlotPanel& panel = req.panels[p];
    g << "set title " << quoted(panel.title) << "\n"
      << "set xlabel " << quoted(req.xlabel) << "\n"
      << "set ylabel " << quoted(panel.ylabel) << "\n"
      << "set grid\nset key top right\n";
    g << (panel.zero_line ? "set xzeroaxis linetype 1 linecolor rgb '#555555' linewidth 1\n" : "unset xzeroaxis\n");
    std::string sep = "plot ";
    // Faint series first, so the smoothed curves are drawn over them.
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t s = 0; s < panel.series.size(); ++s) {
        const PlotSeries& series = panel.series[s];
        if (series.faint != (pass == 0) || !has_points(series)) continue;
        g << sep << quoted(data_file(data_dir, p, s)) << " using 1:2 with lines linewidth " << series.width
          << " linecolor rgb " << quoted(colour_of(series.color, series.faint))
          << (series.title.empty() ? std::string(" notitle") : " title " + quoted(series.title));
        sep = ", \\\n     ";
      }
    }
    g << "\n";
  }
  g << "unset multiplot\n";
  return g.str();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The last non-empty line of gnuplot's error output, for a one-line note.
std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r^") != std::string::npos) last = line;
  }
  return last;
}

struct TempDir {
  std::string path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "flexcp-plot-XXXXXX").string();
    if (::mkdtemp(templ.data())) path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

// Runs argv with stdin from /dev/null and stdout+stderr into `log`; returns the exit status, or -1
// when it could not be started or did not exit normally.
int run_logged(const std::vector<std::string>& argv, const std::string& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool is_executable(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

}  // namespace

std::string gnuplot_find() {
  if (const char* env = std::getenv("FLEXCP_GNUPLOT")) {
    const std::string v = env;
    if (v.empty()) return "";
    if (v.find('/') != std::string::npos) return is_executable(v) ? v : "";
    // A bare name: look it up on PATH like the default.
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path ? path : "");
    for (std::string d; std::getline(dirs, d, ':');) {
      if (!d.empty() && is_executable(d + "/" + v)) return d + "/" + v;
    }
    return "";
  }
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/bin:/bin");
  for (std::string d; std::getline(dirs, d, ':');) {
    if (!d.empty() && is_executable(d + "/gnuplot")) return d + "/gnuplot";
  }
  return "";
}

std::vector<std::string> plot_output_paths(const std::string& out) {
  fs::path p(out);
  const std::string ext = p.extension().string();
  if (ext == ".png" || ext == ".svg") p.replace_extension();
  return {p.string() + ".png", p.string() + ".svg"};
}

std::string plot_gnuplot_script(const PlotRequest& req, const std::string& data_dir, const std::string& png_path,
                                const std::string& svg_path) {
  const std::string draw = draw_commands(req, data_dir);
  int panels = 0;
  for (const auto& p : req.panels) {
    for (const auto& s : p.series) {
      if (has_points(s)) {
        ++panels;
        break;
      }
    }
  }
  const std::string size = std::to_string(req.width) + "," + std::to_string(req.panel_height * std::max(panels, 1));
  std::ostringstream g;
  g << "# Written by flexcp; run with: gnuplot <this file>\n"
    << "terms = ' '.GPVAL_TERMINALS.' '\n";
  if (!png_path.empty()) {
    // pngcairo draws antialiased lines; gd's png is what a gnuplot without cairo has.
    g << "png_term = strstrt(terms, ' pngcairo ') > 0 ? 'pngcairo' : (strstrt(terms, ' png ') > 0 ? 'png' : '')\n"
      << "if (png_term eq '') { print 'flexcp: this gnuplot has no png terminal' } else {\n"
      << "  if (png_term eq 'pngcairo') { set terminal pngcairo size " << size << " noenhanced font 'sans,10' linewidth 1 }"
      << " else { set terminal png size " << size << " noenhanced }\n"
      << "  set output " << quoted(png_path) << "\n"
      << draw << "  unset output\n}\n";
  }
  if (!svg_path.empty()) {
    g << "if (strstrt(terms, ' svg ') == 0) { print 'flexcp: this gnuplot has no svg terminal' } else {\n"
      << "  set terminal svg size " << size << " noenhanced font 'sans,10' background rgb 'white'\n"
      << "  set output " << quoted(svg_path) << "\n"
      << draw << "  unset output\n}\n";
  }
  return g.str();
}

PlotOutcome plot_gnuplot(const PlotRequest& req, const std::string& out) {
  PlotOutcome outcome;
  const auto paths = plot_output_paths(out);
  const fs::path parent = fs::path(paths[0]).parent_path();
  std::error_code ec;
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    fail(out, "the folder " + parent.string() + " does not exist", "create it first or choose another --out");
  }
  bool any_points = false;
  for (const auto& p : req.panels) {
    for (const auto& s : p.series) any_points = any_points || has_points(s);
  }
  if (!any_points) {
    outcome.note = "no plot: there is no finite point to draw";
    return outcome;
  }
  const std::string gnuplot = gnuplot_find();
  if (gnuplot.empty()) {
    const char* env = std::getenv("FLEXCP_GNUPLOT");
    outcome.note = env ? (*env ? "no plot: FLEXCP_GNUPLOT=" + std::string(env) + " is not a runnable program"
                               : std::string("no plot: plotting is off (FLEXCP_GNUPLOT is empty)"))
                       : "no plot: gnuplot is not installed (apt-get install gnuplot-nox, or set FLEXCP_GNUPLOT)";
    return outcome;
  }
  TempDir tmp;
  if (tmp.path.empty()) {
    outcome.note = "no plot: cannot create a temporary folder in " + fs::temp_directory_path().string();
    return outcome;
  }
  for (size_t p = 0; p < req.panels.size(); ++p) {
    for (size_t s = 0; s < req.panels[p].series.size(); ++s) {
      std::ofstream(data_file(tmp.path, p, s), std::ios::binary) << data_text(req.panels[p].series[s]);
    }
  }
  const std::string png_tmp = tmp.path + "/plot.png", svg_tmp = tmp.path + "/plot.svg";
  const std::string script = tmp.path + "/plot.gp", log = tmp.path + "/gnuplot.log";
  std::ofstream(script, std::ios::binary) << plot_gnuplot_script(req, tmp.path, png_tmp, svg_tmp);
  const int rc = run_logged({gnuplot, script}, log);
  const std::string messages = read_text(log);
  if (rc != 0) {
    const std::string why = rc < 0 ? "could not be run" : "failed (exit " + std::to_string(rc) + ")";
    const std::string detail = last_line(messages);
    outcome.note = "no plot: " + gnuplot + " " + why + (detail.empty() ? "" : ": " + detail);
    return outcome;
  }
  std::vector<std::string> missing;
  const std::string tmp_files[2] = {png_tmp, svg_tmp};
  for (int i = 0; i < 2; ++i) {
    if (fs::file_size(tmp_files[i], ec) > 0 && !ec) {
      write_file_atomic(paths[i], read_text(tmp_files[i]));
      outcome.written.push_back(paths[i]);
    } else {
      ec.clear();
      missing.push_back(paths[i]);
    }
  }
  if (!missing.empty()) {
    std::string why = last_line(messages);
    outcome.note = "not drawn: " + missing[0] + (missing.size() > 1 ? " and " + missing[1] : "") +
                   (why.empty() ? "" : " (" + why + ")");
  }
  return outcome;
}

}  // namespace flexcp
