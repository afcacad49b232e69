// Encodes a JSON array of documents with flexcp's tokenizer (core/tokenizer.cpp, the code the
// `flexcp` binary runs) on 1..N threads and prints one JSON line per thread count:
//   {"threads": T, "seconds": s, "bytes": B, "tokens": K, "mb_per_s": ..., "tokens_per_s": ...}
// Used by scripts/bench/tokenizer.sh. With --ids-out FILE it also writes every document's ids
// (uint32 count, then the ids, little-endian) for the exactness check against HF tokenizers.
// With --prepare OUT_DIR it instead times `flexcp prepare-data` (core/prepare_data.cpp) end to end
// on DOCS (any input prepare-data takes), once per thread count.
//   tokenizer_bench TOKENIZER_JSON DOCS_JSON [--threads 1,16] [--repeat R] [--ids-out FILE]
//   tokenizer_bench TOKENIZER_JSON DOCS_JSONL --prepare OUT_DIR [--threads 1,16]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/prepare_data.h"
#include "core/tokenizer.h"

using flexcp::Tokenizer;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: tokenizer_bench TOKENIZER_JSON DOCS_JSON [--threads 1,16] [--repeat R] [--ids-out FILE]\n";
    return 2;
  }
  std::vector<int> thread_counts{1, int(std::thread::hardware_concurrency())};
  int repeat = 3;
  std::string ids_out, prepare_out;
  for (int i = 3; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--threads") {
      thread_counts.clear();
      std::stringstream ss(value);
      for (std::string item; std::getline(ss, item, ',');) thread_counts.push_back(std::stoi(item));
    } else if (flag == "--repeat") {
      repeat = std::stoi(value);
    } else if (flag == "--ids-out") {
      ids_out = value;
    } else if (flag == "--prepare") {
      prepare_out = value;
    }
  }
  if (!prepare_out.empty()) {
    for (int threads : thread_counts) {
      flexcp::PrepareDataOptions o;
      o.inputs = {argv[2]};
      o.out_dir = prepare_out;
      o.tokenizer_path = argv[1];
      o.threads = threads;
      o.progress = false;
      o.force = true;
      auto s = std::chrono::steady_clock::now();
      flexcp::PrepareDataResult r = flexcp::prepare_data(o);
      double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      int64_t tokens = r.train_tokens + r.val_tokens;
      std::printf("{\"prepare_threads\": %d, \"seconds\": %.3f, \"bytes\": %lld, \"tokens\": %lld, \"mb_per_s\": %.2f, "
                  "\"tokens_per_s\": %.0f}\n",
                  threads, sec, (long long)r.input_bytes, (long long)tokens, r.input_bytes / sec / 1e6, tokens / sec);
      std::fflush(stdout);
    }
    return 0;
  }
  auto t0 = std::chrono::steady_clock::now();
  Tokenizer tok = Tokenizer::load(argv[1]);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ifstream in(argv[2]);
  std::vector<std::string> docs = nlohmann::json::parse(in).get<std::vector<std::string>>();
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  std::cerr << "tokenizer_bench: " << docs.size() << " documents, " << bytes / 1e6 << " MB, load " << load_s << " s\n";

  if (!ids_out.empty()) {
    std::ofstream out(ids_out, std::ios::binary);
    std::vector<int32_t> ids;
    for (const auto& d : docs) {
      ids.clear();
      tok.encode(d, ids);
      uint32_t n = uint32_t(ids.size());
      out.write(reinterpret_cast<const char*>(&n), 4);
      out.write(reinterpret_cast<const char*>(ids.data()), std::streamsize(ids.size() * 4));
    }
  }

  for (int threads : thread_counts) {
    double best = 1e30;
    int64_t tokens_total = 0;
    for (int r = 0; r < repeat; ++r) {
      std::atomic<size_t> next{0};
      std::atomic<int64_t> tokens{0};
      auto work = [&] {
        std::vector<int32_t> ids;
        int64_t mine = 0;
        constexpr size_t kBlock = 64;
        for (;;) {
          size_t start = next.fetch_add(kBlock);
          if (start >= docs.size()) break;
          for (size_t i = start; i < std::min(docs.size(), start + kBlock); ++i) {
            ids.clear();
            tok.encode(docs[i], ids);
            mine += int64_t(ids.size());
          }
        }
        tokens += mine;
      };
      auto s = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      for (int k = 0; k < threads; ++k) pool.emplace_back(work);
      for (auto& th : pool) th.join();
      double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      best = std::min(best, sec);
      tokens_total = tokens;
    }
    std::printf("{\"threads\": %d, \"seconds\": %.4f, \"bytes\": %zu, \"tokens\": %lld, \"mb_per_s\": %.2f, "
                "\"tokens_per_s\": %.0f}\n",
                threads, best, bytes, (long long)tokens_total, bytes / best / 1e6, tokens_total / best);
    std::fflush(stdout);
  }
}
