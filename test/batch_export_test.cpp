// flexcp batches: the .npy layout (NumPy format 1.0) and that the rows are the trainer's windows.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/batch_export.h"
#include "core/data_loader.h"

using namespace flexcp;
namespace fs = std::filesystem;

TEST_CASE("npy_int32 writes what numpy.save writes", "[batches]") {
  const std::string npy = npy_int32({0, 1, 2, 3, 4, 5}, 2, 3);
  // numpy.save(f, numpy.arange(6, dtype='<i4').reshape(2, 3)): 128-byte preamble, then the data.
  const std::string dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }";
  REQUIRE(npy.size() == 128 + 6 * 4);
  CHECK(npy.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK(static_cast<unsigned char>(npy[8]) + 256 * static_cast<unsigned char>(npy[9]) == 118);
  CHECK(npy.substr(10, dict.size()) == dict);
  CHECK(npy.substr(10 + dict.size(), 127 - 10 - dict.size()) == std::string(127 - 10 - dict.size(), ' '));
  CHECK(npy[127] == '\n');
  int32_t v[6];
  std::memcpy(v, npy.data() + 128, sizeof(v));
  for (int i = 0; i < 6; ++i) CHECK(v[i] == i);
}

TEST_CASE("batches_export rows are the trainer's windows in step, sample order", "[batches]") {
  RunConfig cfg;
  cfg.model.arch.vocab_size = 1000;
  cfg.data.synthetic = true;
  cfg.train.seq_len = 16;
  cfg.train.global_batch = 2;
  cfg.train.seed = 7;
  const fs::path out = fs::temp_directory_path() / ("flexcp_batches_" + std::to_string(::getpid()) + ".npy");
  REQUIRE(batches_export(cfg, 3, out.string()) == 6);
  std::ifstream in(out, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  fs::remove(out);
  const size_t preamble = 10 + static_cast<unsigned char>(bytes[8]) + 256 * static_cast<unsigned char>(bytes[9]);
  CHECK(preamble % 64 == 0);
  CHECK(bytes.find("'shape': (6, 17)") != std::string::npos);
  REQUIRE(bytes.size() == preamble + 6 * 17 * 4);
  DataLoader loader(cfg.data, 16, 1000, 7, "train", 2);
  for (int64_t step = 0; step < 3; ++step)
    for (int64_t sample = 0; sample < 2; ++sample) {
      const TokenWindow w = loader.window(step, sample);
      REQUIRE(w.tokens.size() == 17);
      std::vector<int32_t> row(17);
      std::memcpy(row.data(), bytes.data() + preamble + (step * 2 + sample) * 17 * 4, 17 * 4);
      CHECK(row == w.tokens);
    }
  CHECK_THROWS(batches_export(cfg, 0, out.string()));
}
