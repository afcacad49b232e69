// libFuzzer target: ShardFile::open (llm.c token shard) on arbitrary bytes. Bad files are UserErrors;
// a shard that opens must let every token be read, one by one and by copy(), with equal results.
#include <vector>

#include "core/errors.h"
#include "core/token_shards.h"
#include "test/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = flexcp_fuzz::scratch_write("shard", data, size);
  try {
    flexcp::ShardFile f = flexcp::ShardFile::open(path);
    const int64_t n = f.num_tokens();
    if (n < 0 || static_cast<uint64_t>(n) * f.token_bytes() + flexcp::kShardHeaderBytes != size) std::abort();
    std::vector<int32_t> all(static_cast<size_t>(n));
    if (n > 0) f.copy(0, n, all.data());
    for (int64_t i = 0; i < n; ++i)
      if (static_cast<uint32_t>(all[i]) != f.token(i)) std::abort();
  } catch (const flexcp::UserError&) {
  }
  return 0;
}
