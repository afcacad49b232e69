// The pipeline: one reader thread cuts the inputs into units (a whole .json file, a whole .txt
// file, or ~1 MiB of .jsonl lines / blank-line-separated .txt blocks), N workers parse and
// tokenize units, and the calling thread consumes the results in input order, filling a train and
// a val buffer and writing a shard whenever one is full. The number of units in flight is bounded,
// so memory stays at a few MiB per thread whatever the input size.
#include "core/prepare_data.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>

#include "core/errors.h"
#include "core/sha256.h"
#include "core/token_shards.h"
#include "core/tokenizer.h"

namespace flexcp {
namespace fs = std::filesystem;
namespace {

enum class SourceKind { kTxt, kJsonl, kJson };

struct Source {
  std::string path;
  SourceKind kind;
  int64_t size = 0;
  int64_t mtime_ns = 0;
};

struct Unit {
  int64_t seq = 0;
  const Source* source = nullptr;
  std::string bytes;
  int64_t first_line = 1;  // line number of bytes[0] in the file (for messages)
};

struct UnitResult {
  std::vector<int32_t> tokens[2];  // [0] train, [1] val (ids < 2^31, written as uint32)
  int64_t documents[2] = {0, 0};
  int64_t empty_documents = 0;
  int64_t replaced_documents = 0;
  int64_t bytes = 0;
};

constexpr size_t kUnitBytes = size_t(1) << 20;

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

bool kind_of(const fs::path& p, SourceKind& kind) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
  if (ext == ".txt") kind = SourceKind::kTxt;
  else if (ext == ".jsonl") kind = SourceKind::kJsonl;
  else if (ext == ".json") kind = SourceKind::kJson;
  else return false;
  return true;
}

bool is_inside(const fs::path& path, const fs::path& dir) {
  auto p = path.begin(), d = dir.begin();
  for (; d != dir.end(); ++d, ++p)
    if (p == path.end() || *p != *d) return false;
  return true;
}

// Files, folders and globs -> sorted, de-duplicated sources (never anything inside out_dir).
std::vector<Source> sources_find(const std::vector<std::string>& inputs, const fs::path& out_dir) {
  std::vector<Source> out;
  std::set<std::string> seen;
  std::error_code ec;
  auto add_file = [&](const fs::path& p, bool explicit_file) {
    SourceKind kind;
    if (!kind_of(p, kind)) {
      if (explicit_file)
        fail(p.string(), "unsupported input type '" + p.extension().string() + "'",
             "give .txt, .jsonl or .json files (or folders of them)");
      return;
    }
    fs::path canon = fs::weakly_canonical(p, ec);
    if (is_inside(canon, out_dir)) return;
    if (!seen.insert(canon.string()).second) return;
    Source s;
    s.path = p.string();
    s.kind = kind;
    s.size = int64_t(fs::file_size(p, ec));
    struct stat st {};
    if (::stat(p.c_str(), &st) == 0) s.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    out.push_back(s);
  };
  auto add_path = [&](const fs::path& p, const std::string& input) {
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> files;
      for (auto it = fs::recursive_directory_iterator(p, fs::directory_options::skip_permission_denied, ec);
           it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (ec) break;
        SourceKind kind;
        if (it->is_regular_file(ec) && kind_of(it->path(), kind)) files.push_back(it->path());
      }
      if (ec) fail(input, "cannot list folder: " + ec.message());
      std::sort(files.begin(), files.end());
      size_t before = out.size();
      for (const auto& f : files) add_file(f, false);
      if (out.size() == before && files.empty())
        fail(input, "folder holds no .txt, .jsonl or .json files", "point at the folder with the text");
    } else if (fs::is_regular_file(p, ec)) {
      add_file(p, true);
    } else if (fs::exists(p, ec)) {
      fail(input, "not a regular file or folder");
    } else {
      fail(input, "input not found", "check the path");
    }
  };
  for (const auto& input : inputs) {
    if (!fs::exists(input, ec) && has_glob_chars(input)) {
      glob_t g{};
      int rc = ::glob(input.c_str(), 0, nullptr, &g);
      std::vector<std::string> matches(g.gl_pathv, g.gl_pathv + (rc == 0 ? g.gl_pathc : 0));
      globfree(&g);
      if (matches.empty()) fail(input, "pattern matches no file", "check the pattern (quote it so the shell leaves it to flexcp)");
      std::sort(matches.begin(), matches.end());
      for (const auto& m : matches) add_path(m, m);
    } else {
      add_path(input, input);
    }
  }
  if (out.empty()) fail("prepare-data", "no input files", "give .txt, .jsonl or .json files, folders or globs");
  return out;
}

std::string read_all(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(path, "cannot open for reading", "check that it exists and is readable");
  std::string s;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  bool bad = std::ferror(f);
  std::fclose(f);
  if (bad) fail(path, "read error");
  return s;
}

bool line_is_blank(std::string_view line) {
  return std::all_of(line.begin(), line.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; });
}

// End of the last complete unit in buf: after the last '\n' (jsonl) or after the last blank line
// (txt blocks). npos when there is none.
size_t unit_cut(std::string_view buf, bool blank_line) {
  if (!blank_line) {
    size_t nl = buf.rfind('\n');
    return nl == std::string_view::npos ? nl : nl + 1;
  }
  size_t cut = std::string_view::npos, start = 0;
  while (start < buf.size()) {
    size_t nl = buf.find('\n', start);
    if (nl == std::string_view::npos) break;
    if (line_is_blank(buf.substr(start, nl - start))) cut = nl + 1;
    start = nl + 1;
  }
  return cut;
}

int64_t count_lines(std::string_view s) { return std::count(s.begin(), s.end(), '\n'); }

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

struct Worker {
  const Tokenizer& tok;
  const PrepareDataOptions& opts;
  int32_t bos;

  void add_document(std::string_view text, UnitResult& r) const {
    if (text.empty()) {
      ++r.empty_documents;
      return;
    }
    std::string storage;
    int64_t replaced = 0;
    std::string_view valid = utf8_sanitize(text, storage, &replaced);
    if (replaced) ++r.replaced_documents;
    // The split hangs on the text's hash: double-precision fraction of the 64-bit range.
    int split = double(fnv1a64(valid) >> 11) * 0x1.0p-53 < opts.val_fraction ? 1 : 0;
    std::vector<int32_t>& out = r.tokens[split];
    out.push_back(bos);
    tok.encode(valid, out);
    ++r.documents[split];
  }

  UnitResult run(const Unit& u) const {
    UnitResult r;
    r.bytes = int64_t(u.bytes.size());
    const std::string& path = u.source->path;
    switch (u.source->kind) {
      case SourceKind::kTxt:
        if (opts.txt_documents == "file") {
          add_document(u.bytes, r);
        } else {
          // Blocks of non-blank lines, joined by their newlines as in the file.
          std::string_view buf = u.bytes;
          size_t start = 0, block_start = std::string_view::npos, block_end = 0;
          while (start < buf.size()) {
            size_t nl = buf.find('\n', start);
            size_t end = nl == std::string_view::npos ? buf.size() : nl;
            if (line_is_blank(buf.substr(start, end - start))) {
              if (block_start != std::string_view::npos) add_document(buf.substr(block_start, block_end - block_start), r);
              block_start = std::string_view::npos;
            } else {
              if (block_start == std::string_view::npos) block_start = start;
              block_end = end;
            }
            start = end + 1;
          }
          if (block_start != std::string_view::npos) add_document(buf.substr(block_start, block_end - block_start), r);
        }
        break;
      case SourceKind::kJsonl: {
        std::string_view buf = u.bytes;
        size_t start = 0;
        int64_t line = u.first_line;
        for (; start < buf.size(); ++line) {
          size_t nl = buf.find('\n', start);
          size_t end = nl == std::string_view::npos ? buf.size() : nl;
          std::string_view text = buf.substr(start, end - start);
          start = end + 1;
          if (line_is_blank(text)) continue;
          std::string where = path + ":" + std::to_string(line);
          nlohmann::json j;
          try {
            j = nlohmann::json::parse(text);
          } catch (const nlohmann::json::exception& e) {
            std::string what = e.what();
            fail(where, "not valid JSON (" + what.substr(what.find(']') + 2) + ")", "each line of a .jsonl file must be one JSON object");
          }
          if (!j.is_object() || !j.contains(opts.text_field) || !j[opts.text_field].is_string())
            fail(where, "no string field \"" + opts.text_field + "\"", "name the text field with --text-field");
          add_document(j[opts.text_field].get_ref<const std::string&>(), r);
        }
        break;
      }
      case SourceKind::kJson: {
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(u.bytes);
        } catch (const nlohmann::json::exception& e) {
          std::string what = e.what();
          fail(path, "not valid JSON (" + what.substr(what.find(']') + 2) + ")", "a .json input must be an array of strings");
        }
        if (!j.is_array())
          fail(path, std::string("top level is a JSON ") + j.type_name() + ", not an array",
               "a .json input must be an array of strings (or of objects with a \"" + opts.text_field + "\" string)");
        for (size_t i = 0; i < j.size(); ++i) {
          const auto& e = j[i];
          if (e.is_string())
            add_document(e.get_ref<const std::string&>(), r);
          else if (e.is_object() && e.contains(opts.text_field) && e[opts.text_field].is_string())
            add_document(e[opts.text_field].get_ref<const std::string&>(), r);
          else
            fail(path, "element " + std::to_string(i) + " is a " + e.type_name() + ", not a string",
                 "a .json input must be an array of strings (or of objects with a \"" + opts.text_field +
                     "\" string; see --text-field)");
        }
        break;
      }
    }
    return r;
  }
};

std::string format_count(double v) {
  char buf[32];
  if (v >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", v / 1e9);
  else if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e4) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  int64_t t = int64_t(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

// A one-line progress bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise.
class ProgressBar {
 public:
  ProgressBar(bool enabled, int64_t total_bytes)
      : enabled_(enabled), tty_(::isatty(2)), total_(std::max<int64_t>(total_bytes, 1)), start_(Clock::now()),
        last_(start_) {}
  void update(int64_t bytes, int64_t docs, int64_t tokens, bool final = false) {
    if (!enabled_) return;
    auto now = Clock::now();
    double since = std::chrono::duration<double>(now - last_).count();
    if (!final && since < (tty_ ? 0.2 : 10.0)) return;
    last_ = now;
    double elapsed = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    double frac = std::min(1.0, double(bytes) / double(total_));
    int filled = int(frac * 24);
    std::string bar = std::string(size_t(filled), '#') + std::string(size_t(24 - filled), '.');
    double eta = frac > 0 ? elapsed * (1 - frac) / frac : -1;
    std::fprintf(stderr, "%sprepare-data %3d%% [%s] %s docs  %s tokens  %s tok/s  %.1f MB/s  %s %s%s",
                 tty_ ? "\r" : "", int(frac * 100), bar.c_str(), format_count(double(docs)).c_str(),
                 format_count(double(tokens)).c_str(), format_count(double(tokens) / elapsed).c_str(),
                 double(bytes) / elapsed / 1e6, final ? "took" : "ETA",
                 format_duration(final ? elapsed : eta).c_str(), tty_ && !final ? "   " : "\n");
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_, tty_;
  int64_t total_;
  Clock::time_point start_, last_;
};

const std::regex& shard_name_pattern() {
  static const std::regex re(R"((train|val)_[0-9a-f]{8}_[0-9]{6}\.bin)");
  return re;
}

// Removes what earlier, interrupted runs left: shards no manifest lists, and temporary files.
void leftovers_remove(const fs::path& dir, const std::set<std::string>& keep) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    // core/atomic_file writes "<name>.tmp.<pid>" first.
    size_t tmp = name.find(".tmp.");
    std::string base = tmp == std::string::npos ? name : name.substr(0, tmp);
    bool ours = (tmp == std::string::npos || tmp > 0) &&
                (std::regex_match(base, shard_name_pattern()) || (tmp != std::string::npos && base == "manifest.json"));
    if (ours && !keep.count(name)) fs::remove(e.path(), ec);
  }
}

// Holds an exclusive lock on <dir>/.prepare-data.lock for the life of the object.
class FolderLock {
 public:
  explicit FolderLock(const fs::path& dir) {
    std::string path = (dir / ".prepare-data.lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
    if (fd_ < 0) fail(dir.string(), "cannot create a lock file in the output folder", "check it is writable");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0)
      fail(dir.string(), "another flexcp prepare-data is writing to this folder", "wait for it or choose another --out");
  }
  ~FolderLock() { ::close(fd_); }

 private:
  int fd_ = -1;
};

}  // namespace

PrepareDataResult prepare_data(const PrepareDataOptions& opts) {
  auto t_start = std::chrono::steady_clock::now();
  if (opts.out_dir.empty()) fail("prepare-data", "no output folder", "give --out DIR");
  if (opts.inputs.empty()) fail("prepare-data", "no inputs", "give .txt, .jsonl or .json files, folders or globs");
  if (opts.txt_documents != "file" && opts.txt_documents != "blank-line")
    fail("--txt-documents", "'" + opts.txt_documents + "' is not \"file\" or \"blank-line\"");
  if (!(opts.val_fraction >= 0 && opts.val_fraction < 1))
    fail("--val-fraction", std::to_string(opts.val_fraction) + " is outside [0, 1)", "e.g. --val-fraction 0.01");
  if (opts.shard_tokens < 1 || opts.shard_tokens > INT32_MAX)
    fail("--shard-tokens", std::to_string(opts.shard_tokens) + " is outside [1, 2^31)", "e.g. --shard-tokens 100000000");
  if (opts.text_field.empty()) fail("--text-field", "is empty", "e.g. --text-field text");

  std::error_code ec;
  fs::path out_dir = fs::weakly_canonical(fs::absolute(opts.out_dir), ec);
  if (fs::exists(out_dir, ec) && !fs::is_directory(out_dir, ec))
    fail(opts.out_dir, "exists and is not a folder", "choose another --out");
  std::vector<Source> sources = sources_find(opts.inputs, out_dir);
  Tokenizer tok = Tokenizer::load(opts.tokenizer_path.empty() ? tokenizer_default_path() : opts.tokenizer_path);
  if (tok.bos_id() < 0)
    fail(tok.path(), "has no <|begin_of_text|> token, which marks where documents start",
         "use the Llama 3 tokenizer (scripts/fetch-data.sh)");

  // The fingerprint of everything the output depends on.
  nlohmann::json settings = {{"txt_documents", opts.txt_documents},
                             {"text_field", opts.text_field},
                             {"val_fraction", opts.val_fraction},
                             {"shard_tokens", opts.shard_tokens},
                             {"document_prefix", "bos"}};
  nlohmann::json inputs = nlohmann::json::array();
  int64_t total_bytes = 0;
  for (const auto& s : sources) {
    inputs.push_back({{"path", fs::absolute(s.path).string()}, {"bytes", s.size}, {"mtime_ns", s.mtime_ns}});
    total_bytes += s.size;
  }
  std::string fingerprint =
      sha256_hex(nlohmann::json{{"tokenizer", tok.sha256()}, {"settings", settings}, {"inputs", inputs}}.dump());

  fs::create_directories(out_dir, ec);
  if (ec) fail(opts.out_dir, "cannot create the output folder: " + ec.message());
  FolderLock lock(out_dir);

  PrepareDataResult result;
  result.files = int64_t(sources.size());
  result.input_bytes = total_bytes;

  // The data set in place (if complete and valid) stays untouched until our manifest replaces it.
  std::set<std::string> keep;
  if (fs::exists(out_dir / "manifest.json", ec)) {
    try {
      Manifest old = manifest_read(out_dir.string());
      dataset_verify(out_dir.string(), old, false);
      for (const auto& s : old.shards) keep.insert(s.file);
      if (!opts.force && old.prepare.value("fingerprint", std::string()) == fingerprint) {
        result.up_to_date = true;
        result.train_documents = old.split_documents("train");
        result.val_documents = old.split_documents("val");
        result.train_tokens = old.split_tokens("train");
        result.val_tokens = old.split_tokens("val");
        result.train_shards = old.split_shards("train");
        result.val_shards = old.split_shards("val");
        return result;
      }
    } catch (const UserError&) {
      keep.clear();  // an unusable data set: rebuild from scratch
    }
  }
  leftovers_remove(out_dir, keep);

  // A tag unique to this run keeps its shard names apart from the data set in place.
  std::string tag = sha256_hex(fingerprint + std::to_string(::getpid()) +
                               std::to_string(std::chrono::system_clock::now().time_since_epoch().count()))
                        .substr(0, 8);
  int threads = opts.threads > 0 ? opts.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  // --- the pipeline
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Unit> queue;
  std::map<int64_t, UnitResult> done;
  int64_t produced = 0, consumed = 0;
  bool reader_finished = false, stop = false;
  std::exception_ptr error;
  const int64_t max_in_flight = int64_t(threads) * 3;
  auto record_error = [&](std::exception_ptr e) {
    std::lock_guard<std::mutex> l(mu);
    if (!error) error = e;
    stop = true;
    cv.notify_all();
  };
  auto push_unit = [&](const Source* src, std::string bytes, int64_t first_line) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return stop || produced - consumed < max_in_flight; });
    if (stop) return false;
    queue.push_back(Unit{produced++, src, std::move(bytes), first_line});
    cv.notify_all();
    return true;
  };
  std::thread reader([&] {
    try {
      for (const auto& src : sources) {
        bool whole = src.kind == SourceKind::kJson || (src.kind == SourceKind::kTxt && opts.txt_documents == "file");
        if (whole) {
          if (!push_unit(&src, read_all(src.path), 1)) return;
          continue;
        }
        FILE* f = std::fopen(src.path.c_str(), "rb");
        if (!f) fail(src.path, "cannot open for reading", "check that it exists and is readable");
        std::string carry;
        int64_t line = 1;
        std::vector<char> buf(kUnitBytes);
        bool ok = true;
        for (;;) {
          size_t n = std::fread(buf.data(), 1, buf.size(), f);
          carry.append(buf.data(), n);
          bool eof = n < buf.size();
          if (carry.size() < kUnitBytes && !eof) continue;
          size_t cut = eof ? carry.size() : unit_cut(carry, src.kind == SourceKind::kTxt);
          if (cut == std::string::npos || cut == 0) {
            if (eof) break;
            continue;  // no boundary yet: read more
          }
          std::string unit = carry.substr(0, cut);
          carry.erase(0, cut);
          int64_t lines = count_lines(unit);
          if (!push_unit(&src, std::move(unit), line)) {
            ok = false;
            break;
          }
          line += lines;
          if (eof) break;
        }
        bool bad = std::ferror(f);
        std::fclose(f);
        if (bad) fail(src.path, "read error");
        if (!ok) return;
      }
    } catch (...) {
      record_error(std::current_exception());
    }
    std::lock_guard<std::mutex> l(mu);
    reader_finished = true;
    cv.notify_all();
  });
  Worker worker{tok, opts, tok.bos_id()};
  std::vector<std::thread> workers;
  for (int w = 0; w < threads; ++w)
    workers.emplace_back([&] {
      for (;;) {
        Unit u;
        {
          std::unique_lock<std::mutex> l(mu);
          cv.wait(l, [&] { return stop || !queue.empty() || reader_finished; });
          if (stop || queue.empty()) return;
          u = std::move(queue.front());
          queue.pop_front();
        }
        try {
          UnitResult r = worker.run(u);
          std::lock_guard<std::mutex> l(mu);
          done.emplace(u.seq, std::move(r));
          cv.notify_all();
        } catch (...) {
          record_error(std::current_exception());
          return;
        }
      }
    });

  // --- the writer (this thread)
  Manifest manifest;
  manifest.created_by = std::string("flexcp ") + FLEXCP_VERSION;
  manifest.tokenizer_name = tok.name();
  manifest.tokenizer_sha256 = tok.sha256();
  manifest.vocab_size = tok.vocab_size();
  manifest.bos_id = tok.bos_id();
  manifest.eos_id = tok.eos_id();
  std::vector<std::string> written;  // our shard files, removed again if the run fails
  std::vector<int32_t> pending[2];
  int64_t shard_index[2] = {0, 0};
  const char* split_names[2] = {"train", "val"};
  const int32_t bos = tok.bos_id();
  // Full shards are hashed and written by background tasks (at most two at a time) so that this
  // thread keeps consuming results; manifest entries are added in submission order.
  struct ShardInFlight {
    ManifestShard entry;
    std::future<ShardWriteResult> result;
  };
  std::deque<ShardInFlight> in_flight;
  auto finish_oldest = [&] {
    ShardInFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    ShardWriteResult w = f.result.get();  // rethrows a write error
    f.entry.tokens = w.tokens;
    f.entry.max_token_id = w.max_token_id;
    f.entry.sha256 = w.sha256;
    manifest.shards.push_back(f.entry);
  };
  auto write_shard = [&](int split, size_t count) {
    char index[16];
    std::snprintf(index, sizeof index, "%06lld", (long long)shard_index[split]++);
    ShardInFlight f;
    f.entry.file = std::string(split_names[split]) + "_" + tag + "_" + index + ".bin";
    f.entry.split = split_names[split];
    std::string path = (out_dir / f.entry.file).string();
    written.push_back(path);
    // Hand the first `count` tokens over without copying them (only the remainder is copied).
    std::vector<int32_t> rest(pending[split].begin() + std::ptrdiff_t(count), pending[split].end());
    pending[split].resize(count);
    auto data = std::make_shared<std::vector<int32_t>>(std::move(pending[split]));
    pending[split] = std::move(rest);
    f.entry.documents = std::count(data->begin(), data->end(), bos);
    f.result = std::async(std::launch::async, [path, data] {
      return shard_write(path, reinterpret_cast<const uint32_t*>(data->data()), int64_t(data->size()));
    });
    in_flight.push_back(std::move(f));
    while (in_flight.size() > 2) finish_oldest();
  };
  ProgressBar bar(opts.progress, total_bytes);
  int64_t bytes_done = 0, docs_done = 0, tokens_done = 0;
  try {
    for (;;) {
      UnitResult r;
      {
        std::unique_lock<std::mutex> l(mu);
        cv.wait_for(l, std::chrono::milliseconds(250), [&] {
          return stop || done.count(consumed) || (reader_finished && consumed == produced);
        });
        if (error) std::rethrow_exception(error);
        if (reader_finished && consumed == produced) break;
        auto it = done.find(consumed);
        if (it == done.end()) {
          l.unlock();
          bar.update(bytes_done, docs_done, tokens_done);
          continue;
        }
        r = std::move(it->second);
        done.erase(it);
        ++consumed;
        cv.notify_all();
      }
      for (int split = 0; split < 2; ++split) {
        pending[split].insert(pending[split].end(), r.tokens[split].begin(), r.tokens[split].end());
        tokens_done += int64_t(r.tokens[split].size());
        docs_done += r.documents[split];
        while (int64_t(pending[split].size()) >= opts.shard_tokens) write_shard(split, size_t(opts.shard_tokens));
      }
      result.train_documents += r.documents[0];
      result.val_documents += r.documents[1];
      result.empty_documents += r.empty_documents;
      result.utf8_replaced_documents += r.replaced_documents;
      bytes_done += r.bytes;
      bar.update(bytes_done, docs_done, tokens_done);
    }
    for (int split = 0; split < 2; ++split)
      if (!pending[split].empty()) write_shard(split, pending[split].size());
    while (!in_flight.empty()) finish_oldest();
  } catch (...) {
    for (auto& f : in_flight) f.result.wait();
    {
      std::lock_guard<std::mutex> l(mu);
      stop = true;
      cv.notify_all();
    }
    reader.join();
    for (auto& w : workers) w.join();
    for (const auto& p : written) fs::remove(p, ec);
    throw;
  }
  reader.join();
  for (auto& w : workers) w.join();
  bar.update(bytes_done, docs_done, tokens_done, true);

  if (result.train_documents == 0)
    fail(opts.inputs.front(), "the inputs hold no training documents (all empty, or all drawn for validation)",
         "check the inputs (and --val-fraction)");
  result.train_tokens = manifest.split_tokens("train");
  result.val_tokens = manifest.split_tokens("val");
  result.train_shards = manifest.split_shards("train");
  result.val_shards = manifest.split_shards("val");
  manifest.prepare = {{"fingerprint", fingerprint},
                      {"settings", settings},
                      {"inputs", inputs},
                      {"tokenizer_path", fs::absolute(tok.path()).string()},
                      {"empty_documents_skipped", result.empty_documents},
                      {"utf8_replaced_documents", result.utf8_replaced_documents}};
  manifest_write(out_dir.string(), manifest);  // the commit point
  std::set<std::string> ours;
  for (const auto& s : manifest.shards) ours.insert(s.file);
  leftovers_remove(out_dir, ours);  // the previous data set's shards
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return result;
}

}  // namespace flexcp
