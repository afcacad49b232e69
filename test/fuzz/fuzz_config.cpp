// libFuzzer target: the YAML run config loader. Input = YAML text, optionally followed by a NUL byte
// and newline-separated `--set key=value` overrides. Bad configs are UserErrors; a config that loads
// must print (config_to_yaml) to YAML that loads again to the same config.
#include <string>
#include <vector>

#include "core/config.h"
#include "core/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string yaml = in.substr(0, nul);
  std::vector<std::string> sets;
  if (nul != std::string::npos) {
    size_t pos = nul + 1;
    while (pos <= in.size()) {
      size_t nl = in.find('\n', pos);
      if (nl == std::string::npos) nl = in.size();
      if (nl > pos) sets.push_back(in.substr(pos, nl - pos));
      pos = nl + 1;
    }
  }
  try {
    const flexcp::RunConfig cfg = flexcp::config_from_string(yaml, "fuzz.yaml", sets);
    const std::string printed = flexcp::config_to_yaml(cfg);
    const flexcp::RunConfig again = flexcp::config_from_string(printed, "fuzz-printed.yaml");
    if (flexcp::config_to_yaml(again) != printed) std::abort();
    (void)flexcp::config_derive(cfg, 1);
  } catch (const flexcp::UserError&) {
  }
  return 0;
}
