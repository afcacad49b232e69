#include "core/batch_export.h"

#include <cstring>

#include "core/atomic_file.h"
#include "core/data_loader.h"
#include "core/errors.h"

namespace flexcp {

std::string npy_int32(const std::vector<int32_t>& values, int64_t rows, int64_t cols) {
  if (static_cast<int64_t>(values.size()) != rows * cols) fail("npy_int32", "values do not fill the shape");
  std::string header = "{'descr': '<i4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64
  // and ended by a newline, as the format asks.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>((header.size() >> 8) & 0xff);
  out += header;
  const size_t at = out.size();
  out.resize(at + values.size() * sizeof(int32_t));
  std::memcpy(out.data() + at, values.data(), values.size() * sizeof(int32_t));  // little-endian host
  return out;
}

int64_t batches_export(const RunConfig& cfg, int64_t steps, const std::string& path) {
  if (steps < 1) fail("--steps", "must be at least 1, got " + std::to_string(steps));
  const auto& t = cfg.train;
  DataLoader loader(cfg.data, t.seq_len, cfg.model.arch.vocab_size, t.seed, "train", t.global_batch);
  const int64_t rows = steps * t.global_batch, cols = t.seq_len + 1;
  if (rows * cols * 4 > (int64_t(4) << 30))
    fail("--steps", std::to_string(rows) + " windows of " + std::to_string(cols) + " tokens exceed 4 GiB",
         "export fewer steps");
  std::vector<int32_t> values;
  values.reserve(static_cast<size_t>(rows * cols));
  for (int64_t step = 0; step < steps; ++step)
    for (int64_t sample = 0; sample < t.global_batch; ++sample) {
      const TokenWindow w = loader.window(step, sample);
      values.insert(values.end(), w.tokens.begin(), w.tokens.end());
    }
  write_file_atomic(path, npy_int32(values, rows, cols));
  return rows;
}

}  // namespace flexcp
