#include "core/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/errors.h"

namespace flexcp {
namespace fs = std::filesystem;

namespace {

std::string step_folder_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void write_text_synced(const fs::path& p, const std::string& text) {
  {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << text;
    f.flush();
    if (!f) fail(p.string(), "could not write the file", "check free disk space and permissions");
  }
  fsync_path(p);
}

// Complete checkpoints in `dir`, oldest first.
std::vector<fs::path> list_checkpoints(const std::string& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const auto name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step_", 0) == 0 && name.find('.') == std::string::npos &&
        fs::exists(e.path() / "state.json"))
      out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::string checkpoint_save(const std::string& dir, int64_t step, const NamedTensors& model,
                            const NamedTensors& optimizer, const nlohmann::json& state, int64_t keep_last) {
  fs::create_directories(dir);
  // Leftovers of an interrupted save are never loaded; clear them before writing a new one.
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".partial") != std::string::npos) fs::remove_all(e.path());
  const fs::path final_dir = fs::path(dir) / step_folder_name(step);
  const fs::path tmp_dir = fs::path(dir) / (step_folder_name(step) + ".partial");
  fs::create_directories(tmp_dir);
  try {
    safetensors_save((tmp_dir / "model.safetensors").string(), model);
    safetensors_save((tmp_dir / "optimizer.safetensors").string(), optimizer);
    nlohmann::json st = state;
    st["step"] = step;
    write_text_synced(tmp_dir / "state.json", st.dump(1));
    fsync_path(tmp_dir);
    if (fs::exists(final_dir)) fs::remove_all(final_dir);  // re-saving a step replaces it whole
    fs::rename(tmp_dir, final_dir);
    fsync_path(dir);
  } catch (const fs::filesystem_error& e) {
    fail(final_dir.string(), std::string("could not write the checkpoint: ") + e.what(),
         "check free disk space; the previous checkpoint is intact");
  }
  if (keep_last > 0) {
    auto all = list_checkpoints(dir);
    for (size_t n = 0; n + keep_last < all.size(); ++n) fs::remove_all(all[n]);
  }
  return final_dir.string();
}

std::string checkpoint_find_latest(const std::string& dir) {
  auto all = list_checkpoints(dir);
  return all.empty() ? std::string() : all.back().string();
}

namespace {
nlohmann::json read_state(const std::string& path, int64_t& step) {
  const fs::path state_path = fs::path(path) / "state.json";
  std::ifstream f(state_path);
  if (!f) fail(state_path.string(), "not found", "give a checkpoint folder (step_*) written by flexcp train");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    auto state = nlohmann::json::parse(ss.str());
    step = state.at("step").get<int64_t>();
    return state;
  } catch (const std::exception& e) {
    fail(state_path.string(), std::string("unreadable checkpoint state: ") + e.what(), "use an older checkpoint");
  }
}
}  // namespace

int64_t checkpoint_load_step(const std::string& path) {
  int64_t step = 0;
  read_state(path, step);
  return step;
}

CheckpointContents checkpoint_load(const std::string& path) {
  CheckpointContents c;
  c.path = path;
  c.state = read_state(path, c.step);
  for (auto [file, target] : {std::pair{"model.safetensors", &c.model}, std::pair{"optimizer.safetensors", &c.optimizer}}) {
    auto st = SafetensorsFile::open((fs::path(path) / file).string());
    for (const auto& name : st->names()) (*target)[name] = st->copy(name);
  }
  return c;
}

}  // namespace flexcp
