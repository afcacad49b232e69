// libFuzzer target: SafetensorsFile::open on arbitrary bytes. The contract (core/safetensors.h): any
// problem is a UserError; a file that opens hands out every tensor, as a view and as a copy, with the
// same bytes. Anything else (another exception, a sanitizer report) is a bug.
#include <cstring>

#include "core/errors.h"
#include "core/safetensors.h"
#include "test/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = flexcp_fuzz::scratch_write("safetensors", data, size);
  try {
    auto f = flexcp::SafetensorsFile::open(path);
    for (const auto& name : f->names()) {
      const auto& e = f->entry(name);
      at::Tensor v = f->view(name), c = f->copy(name);
      if (static_cast<uint64_t>(c.numel()) * c.element_size() != e.nbytes()) std::abort();
      if (e.nbytes() > 0 && std::memcmp(v.data_ptr(), c.data_ptr(), e.nbytes()) != 0) std::abort();
    }
  } catch (const flexcp::UserError&) {
  }
  return 0;
}
