// Line plots through gnuplot (Debian's gnuplot-nox): we write the data and a script into a temporary
// folder, run gnuplot on it, and move the pictures into place atomically. gnuplot is optional: when it
// is missing or fails, nothing is written and the outcome says why in one line, so callers can print
// that note and carry on (a table is still a complete answer).
#pragma once
#include <string>
#include <vector>

namespace flexcp {

struct PlotSeries {
  std::string title;           // legend entry; empty = not in the legend
  std::vector<double> x, y;    // same length; a non-finite y is a gap in the line
  int color = 0;               // palette index (one run keeps its colour in every panel); -1 = black
  double width = 1.5;          // line width
  bool faint = false;          // lighter shade of the colour (raw curves behind smoothed ones)
};

struct PlotPanel {
  std::string title;
  std::string ylabel;
  std::vector<PlotSeries> series;
  bool zero_line = false;  // draw y = 0 (for deltas)
};

struct PlotRequest {
  std::string title;
  std::string xlabel = "step";
  std::vector<PlotPanel> panels;  // stacked top to bottom
  int width = 1200;
  int panel_height = 420;
};

struct PlotOutcome {
  std::vector<std::string> written;  // the picture files now in place
  std::string note;                  // empty when every picture was drawn; else why not, one line
};

// The gnuplot program: $FLEXCP_GNUPLOT when set (an empty value disables plotting), else `gnuplot`
// found on PATH. Returns "" when there is none.
std::string gnuplot_find();

// `out` names the pictures: "loss.png", "loss.svg" or "loss" all give loss.png and loss.svg. Draws
// a PNG (pngcairo, else gd's png) and an SVG, whichever terminals this gnuplot has. Never throws for
// a missing or failing gnuplot (see PlotOutcome::note); throws UserError only when `out`'s folder
// does not exist.
PlotOutcome plot_gnuplot(const PlotRequest& request, const std::string& out);

// The two file names plot_gnuplot writes for `out`: {stem.png, stem.svg}.
std::vector<std::string> plot_output_paths(const std::string& out);

// The gnuplot script that draws `request` (data files named <data_dir>/s<panel>_<series>.dat) to the
// given outputs; either output may be "" to skip it. Exposed for tests.
std::string plot_gnuplot_script(const PlotRequest& request, const std::string& data_dir, const std::string& png_path,
                                const std::string& svg_path);

}  // namespace flexcp
