// libFuzzer target: the data set manifest reader (manifest_from_json) on arbitrary JSON. Bad manifests
// are UserErrors; a manifest that reads must survive a write/read round trip unchanged.
#include "core/errors.h"
#include "core/token_shards.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    const flexcp::Manifest m = flexcp::manifest_from_json(j, "fuzz/manifest.json");
    const auto again = flexcp::manifest_to_json(m);
    const flexcp::Manifest m2 = flexcp::manifest_from_json(again, "fuzz/manifest.json (round trip)");
    if (flexcp::manifest_to_json(m2).dump() != again.dump()) std::abort();
    for (const char* split : {"train", "val"}) (void)m.split_tokens(split);
  } catch (const flexcp::UserError&) {
  }
  return 0;
}
