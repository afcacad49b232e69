#include "core/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/errors.h"

namespace flexcp {
namespace fs = std::filesystem;

// The format is little-endian; so are all machines we build for (x86-64, aarch64).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace {

// Same bound as the reference Rust implementation: a larger header is a corrupt length field.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};

const std::vector<DtypeName>& dtype_table() {
  static const std::vector<DtypeName> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool},
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
      {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2},
#endif
  };
  return table;
}

std::string dtype_names_list() {
  std::string s;
  for (const auto& d : dtype_table()) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

std::string errno_text() { return std::strerror(errno); }

// a * b with overflow detection.
bool mul_overflows(uint64_t a, uint64_t b, uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return true;
  out = a * b;
  return false;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

}  // namespace

bool safetensors_dtype_from_name(const std::string& name, at::ScalarType& out) {
  for (const auto& d : dtype_table())
    if (name == d.name) {
      out = d.type;
      return true;
    }
  return false;
}

std::string safetensors_dtype_name(at::ScalarType t) {
  for (const auto& d : dtype_table())
    if (t == d.type) return d.name;
  fail("safetensors", std::string("tensors of type ") + c10::toString(t) + " cannot be saved",
       "convert to one of " + dtype_names_list());
}

// ---------------------------------------------------------------------------------------------
// Reading

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t len = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) ::munmap(addr, len);
  }
};

SafetensorsFile::~SafetensorsFile() = default;

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(), "check the path");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, "cannot stat: " + errno_text());
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file", "point at a .safetensors file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail(path, "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length",
         "the file is truncated or not a safetensors file");
  }
  auto m = std::make_shared<Mapping>();
  // Private and writable: copy-on-write pages, so a caller that modifies a view in place cannot
  // crash on a read-only page nor change the file.
  m->addr = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m->addr == MAP_FAILED) fail(path, "mmap failed: " + errno_text());
  m->len = file_size;
  f->mapping_ = m;
  const auto* bytes = static_cast<const unsigned char*>(m->addr);

  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);
  if (header_len > file_size - 8)
    fail(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                   std::to_string(file_size) + " bytes)",
         "the file is truncated or not a safetensors file");
  if (header_len > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(header_len) + " is over the 100 MiB limit",
         "the file is corrupt or not a safetensors file");
  f->data_start_ = 8 + header_len;
  const uint64_t data_len = file_size - f->data_start_;

  nlohmann::json header;
  try {
    const char* h = reinterpret_cast<const char*>(bytes + 8);
    header = nlohmann::json::parse(h, h + header_len);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("header is not valid JSON (") + e.what() + ")",
         "the file is corrupt or not a safetensors file");
  }
  if (!header.is_object()) fail(path, "header is not a JSON object", "the file is corrupt or not a safetensors file");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(path, "__metadata__ is not an object of strings", "the file is corrupt");
      for (auto m2 = v.begin(); m2 != v.end(); ++m2) {
        if (!m2.value().is_string()) fail(path, "__metadata__." + m2.key() + " is not a string", "the file is corrupt");
        f->metadata_[m2.key()] = m2.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!v.is_object()) fail(where, "header entry is not an object", "the file is corrupt");
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail(where, "missing or non-string \"dtype\"", "the file is corrupt");
    if (!v.contains("shape") || !v["shape"].is_array()) fail(where, "missing or non-array \"shape\"", "the file is corrupt");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      fail(where, "\"data_offsets\" must be an array of two offsets", "the file is corrupt");
    SafetensorsEntry e;
    e.name = name;
    e.dtype_name = v["dtype"].get<std::string>();
    if (!safetensors_dtype_from_name(e.dtype_name, e.dtype))
      fail(where, "unsupported dtype '" + e.dtype_name + "'", "expected one of " + dtype_names_list());
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail(where, "shape " + v["shape"].dump() + " has a non-integer or negative size", "the file is corrupt");
      uint64_t n = d.get<uint64_t>();
      if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || mul_overflows(numel, n, numel))
        fail(where, "shape " + v["shape"].dump() + " is too large", "the file is corrupt");
      e.shape.push_back(static_cast<int64_t>(n));
    }
    for (const auto& o : v["data_offsets"])
      if (!o.is_number_unsigned()) fail(where, "data_offsets " + v["data_offsets"].dump() + " are not non-negative integers", "the file is corrupt");
    e.begin = v["data_offsets"][0].get<uint64_t>();
    e.end = v["data_offsets"][1].get<uint64_t>();
    if (e.end < e.begin) fail(where, "data_offsets " + v["data_offsets"].dump() + " end before they begin", "the file is corrupt");
    if (e.end > data_len)
      fail(where, "data_offsets " + v["data_offsets"].dump() + " run past the data buffer (" + std::to_string(data_len) + " bytes)",
           "the file is truncated or corrupt");
    uint64_t expect = 0;
    if (mul_overflows(numel, static_cast<uint64_t>(c10::elementSize(e.dtype)), expect) || expect != e.nbytes())
      fail(where, "shape " + shape_text(e.shape) + " of " + e.dtype_name + " needs " + std::to_string(expect) +
                      " bytes but data_offsets span " + std::to_string(e.nbytes()),
           "the file is corrupt");
    f->entries_.emplace(name, std::move(e));
  }

  // The tensors must tile the data buffer exactly: no overlap, no hole, nothing left over.
  std::vector<const SafetensorsEntry*> order;
  for (const auto& kv : f->entries_) order.push_back(&kv.second);
  std::sort(order.begin(), order.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry* e : order) {
    if (e->begin < pos)
      fail(path, "tensors '" + prev->name + "' and '" + e->name + "' overlap in the data buffer", "the file is corrupt");
    if (e->begin > pos)
      fail(path, "hole of " + std::to_string(e->begin - pos) + " bytes in the data buffer before tensor '" + e->name + "'",
           "the file is corrupt");
    pos = e->end;
    prev = e;
  }
  if (pos != data_len)
    fail(path, "data buffer has " + std::to_string(data_len) + " bytes but the tensors cover " + std::to_string(pos),
         "the file is corrupt or has trailing bytes");
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail(path_, "no tensor named '" + name + "'", "the file holds " + std::to_string(entries_.size()) + " other tensors");
  return it->second;
}

at::Tensor SafetensorsFile::copy(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
  if (e.nbytes() > 0)
    std::memcpy(t.data_ptr(), static_cast<const char*>(mapping_->addr) + data_start_ + e.begin, e.nbytes());
  return t;
}

at::Tensor SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  char* p = static_cast<char*>(mapping_->addr) + data_start_ + e.begin;
  const auto elem = static_cast<uintptr_t>(c10::elementSize(e.dtype));
  if (e.nbytes() == 0 || reinterpret_cast<uintptr_t>(p) % elem != 0) return copy(name);
  std::shared_ptr<Mapping> keep = mapping_;  // the view owns a reference to the mapping
  return at::from_blob(
      p, e.shape, [keep](void*) mutable { keep.reset(); }, at::TensorOptions().dtype(e.dtype));
}

// ---------------------------------------------------------------------------------------------
// Sets of files (sharded folders)

SafetensorsSet SafetensorsSet::open(const std::string& path) {
  SafetensorsSet set;
  set.source_ = path;
  std::string index_path, single_path;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    if (fs::exists(fs::path(path) / "model.safetensors.index.json"))
      index_path = (fs::path(path) / "model.safetensors.index.json").string();
    else if (fs::exists(fs::path(path) / "model.safetensors"))
      single_path = (fs::path(path) / "model.safetensors").string();
    else
      fail(path, "no model.safetensors or model.safetensors.index.json in this folder",
           "point at an HF model folder that has its weights");
  } else if (path.size() > 5 && path.compare(path.size() - 5, 5, ".json") == 0) {
    index_path = path;
  } else {
    single_path = path;
  }

  if (!single_path.empty()) {
    set.files_.push_back(SafetensorsFile::open(single_path));
    for (const auto& n : set.files_[0]->names()) set.where_[n] = 0;
    return set;
  }

  std::ifstream in(index_path);
  if (!in) fail(index_path, "cannot open: " + errno_text(), "check the path");
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(index_path, std::string("not valid JSON (") + e.what() + ")", "the index file is corrupt");
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail(index_path, "no \"weight_map\" object", "a sharded HF folder's index maps each tensor to its file");
  const fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, size_t> file_index;
  std::map<std::string, std::string> listed;  // tensor -> file name
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) fail(index_path, "weight_map." + it.key() + " is not a file name", "the index file is corrupt");
    const std::string file = it.value().get<std::string>();
    if (file.empty() || fs::path(file).is_absolute() || file.find("..") != std::string::npos)
      fail(index_path, "weight_map." + it.key() + " names '" + file + "', not a file inside the folder", "the index file is corrupt");
    listed[it.key()] = file;
    if (!file_index.count(file)) {
      file_index[file] = set.files_.size();
      set.files_.push_back(SafetensorsFile::open((dir / file).string()));
    }
  }
  for (const auto& kv : listed) {
    const size_t fi = file_index.at(kv.second);
    if (!set.files_[fi]->contains(kv.first))
      fail(index_path, "tensor '" + kv.first + "' is listed in " + kv.second + " but that file does not hold it",
           "the shards and the index do not belong together");
    set.where_[kv.first] = fi;
  }
  for (const auto& f : set.files_)
    for (const auto& n : f->names()) {
      auto it = listed.find(n);
      if (it == listed.end())
        fail(f->path(), "tensor '" + n + "' is not in the index's weight_map", "the shards and the index do not belong together");
      if ((dir / it->second).string() != f->path())
        fail(f->path(), "tensor '" + n + "' is also here, but the index places it in " + it->second,
             "the shards and the index do not belong together");
    }
  return set;
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const SafetensorsFile& SafetensorsSet::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(source_, "no tensor named '" + name + "'");
  return *files_[it->second];
}

const SafetensorsEntry& SafetensorsSet::entry(const std::string& name) const { return file_of(name).entry(name); }

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

uint64_t tensor_bytes(const at::Tensor& t) { return static_cast<uint64_t>(t.numel()) * t.element_size(); }

void check_names(const std::string& where, const NamedTensors& tensors) {
  std::set<std::string> seen;
  for (const auto& nt : tensors) {
    if (nt.first.empty() || nt.first == "__metadata__")
      fail(where, "invalid tensor name '" + nt.first + "'", "names must be non-empty and not __metadata__");
    if (!seen.insert(nt.first).second) fail(where, "tensor name '" + nt.first + "' appears twice", "names must be unique");
    if (!nt.second.defined()) fail(where, "tensor '" + nt.first + "' is undefined");
  }
}

bool is_shard_name(const std::string& f, const std::string& prefix) {
  // <prefix>-00001-of-00003.safetensors
  const std::string head = prefix + "-", tail = ".safetensors";
  if (f.size() != head.size() + 14 + tail.size()) return false;
  if (f.compare(0, head.size(), head) != 0 || f.compare(f.size() - tail.size(), tail.size(), tail) != 0) return false;
  const std::string mid = f.substr(head.size(), 14);  // ddddd-of-ddddd
  for (int i : {0, 1, 2, 3, 4, 9, 10, 11, 12, 13})
    if (!std::isdigit(static_cast<unsigned char>(mid[i]))) return false;
  return mid.compare(5, 4, "-of-") == 0;
}

std::string shard_name(const std::string& prefix, size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "-%05zu-of-%05zu.safetensors", i, n);
  return prefix + buf;
}

}  // namespace

void safetensors_save(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  check_names(path, tensors);
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json m = nlohmann::json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    header["__metadata__"] = m;
  }
  uint64_t offset = 0;
  for (const auto& nt : tensors) {
    const at::Tensor& t = nt.second;
    const uint64_t n = tensor_bytes(t);
    header[nt.first] = {{"dtype", safetensors_dtype_name(t.scalar_type())},
                        {"shape", t.sizes().vec()},
                        {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data buffer 8-byte aligned, as HF does
  const uint64_t header_len = text.size();

  AtomicFileWriter w(path);  // readers see the old file or the whole new one
  w.write(&header_len, 8);
  w.write(text.data(), text.size());
  for (const auto& nt : tensors) {
    // One tensor at a time on the host, so saving a GPU model needs little host memory.
    at::Tensor t = nt.second.detach().to(at::kCPU).contiguous();
    if (t.numel() > 0) w.write(t.data_ptr(), tensor_bytes(t));
  }
  w.commit();
}

std::vector<std::string> safetensors_save_sharded(const std::string& dir, const NamedTensors& tensors,
                                                  uint64_t max_shard_bytes, const std::string& prefix) {
  check_names(dir, tensors);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create folder: " + ec.message(), "check permissions");
  const fs::path d(dir);
  const std::string single = prefix + ".safetensors", index = prefix + ".safetensors.index.json";

  std::vector<NamedTensors> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& nt : tensors) {
    const uint64_t n = tensor_bytes(nt.second);
    if (max_shard_bytes > 0 && !shards.back().empty() && in_shard + n > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(nt);
    in_shard += n;
    total += n;
  }

  // An old index would send readers to old shards: remove it before anything else changes.
  fs::remove(d / index, ec);
  std::vector<std::string> written;
  if (shards.size() == 1) {
    safetensors_save((d / single).string(), shards[0]);
    written.push_back(single);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string name = shard_name(prefix, i + 1, shards.size());
      safetensors_save((d / name).string(), shards[i]);
      for (const auto& nt : shards[i]) weight_map[nt.first] = name;
      written.push_back(name);
    }
    nlohmann::json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file_atomic((d / index).string(), idx.dump(2) + "\n");
    written.push_back(index);
    fs::remove(d / single, ec);
  }
  // Shards of an earlier save with another count would confuse a later reader of the folder.
  std::set<std::string> keep(written.begin(), written.end());
  for (const auto& de : fs::directory_iterator(d, ec)) {
    const std::string f = de.path().filename().string();
    if (is_shard_name(f, prefix) && !keep.count(f)) fs::remove(de.path(), ec);
  }
  return written;
}

}  // namespace flexcp
