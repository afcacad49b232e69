// safetensors files (https://github.com/huggingface/safetensors): the weight format of HF models and
// of our checkpoints. Layout: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data buffer; offsets are relative to the buffer, which the tensors must cover exactly.
//
// Reading memory-maps the file and checks the header completely before any tensor is handed out:
// every problem is a UserError of one line naming the file and the tensor. Tensors come out as
// zero-copy views of the mapping (the mapping lives as long as any view) or as copies.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace flexcp {

// Tensors in the order they should be written (names must be unique).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;          // as in the file: "F32", "BF16", ...
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;              // byte offsets inside the data buffer, half-open
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

// "F32" -> at::kFloat etc. Returns false for a dtype string LibTorch has no type for.
bool safetensors_dtype_from_name(const std::string& name, at::ScalarType& out);
// at::kFloat -> "F32"; throws UserError for a type safetensors has no name for.
std::string safetensors_dtype_name(at::ScalarType t);

class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws UserError on any problem (see the file comment).
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // Throws UserError naming the file when `name` is absent.
  const SafetensorsEntry& entry(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Zero-copy CPU tensor over the mapping. The mapping is private (copy-on-write), so an in-place
  // write changes this process's view only, never the file. Falls back to a copy when the data is
  // not aligned for its dtype.
  at::Tensor view(const std::string& name) const;
  // An owning CPU copy, independent of the mapping.
  at::Tensor copy(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  uint64_t data_start_ = 0;  // 8 + header length
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a model folder, single file or sharded:
//  - `model.safetensors.index.json` ({"weight_map": {tensor: file}}) when present: every listed
//    file is opened and every tensor must be where the index says; a shard tensor the index does
//    not list is an error too (the files do not belong together);
//  - else `model.safetensors`;
//  - `path` may also name a single .safetensors file or an index file directly.
class SafetensorsSet {
 public:
  static SafetensorsSet open(const std::string& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  at::Tensor view(const std::string& name) const { return file_of(name).view(name); }
  at::Tensor copy(const std::string& name) const { return file_of(name).copy(name); }
  const std::string& source() const { return source_; }  // for messages: the folder or file opened
  size_t num_files() const { return files_.size(); }

 private:
  std::string source_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
};

// Writes one file atomically (temporary file, fsync, rename). Tensors may live on any device and
// need not be contiguous; they are written in the given order. `metadata` goes to __metadata__
// ({"format": "pt"} as HF and PyTorch write it, unless given otherwise).
void safetensors_save(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes a model folder as HF does: a single `<prefix>.safetensors` when everything fits in
// `max_shard_bytes` (0 = no limit), else `<prefix>-0000k-of-0000n.safetensors` shards plus
// `<prefix>.safetensors.index.json` (written last, so a folder with an index is complete).
// Stale files of the other layout are removed. Returns the file names written.
std::vector<std::string> safetensors_save_sharded(const std::string& dir, const NamedTensors& tensors,
                                                  uint64_t max_shard_bytes, const std::string& prefix = "model");

}  // namespace flexcp
