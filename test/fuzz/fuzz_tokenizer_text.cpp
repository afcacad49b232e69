// libFuzzer target: encoding arbitrary bytes with the real Llama 3 tokenizer (tokenizer_default_path(),
// i.e. $FLEXCP_TOKENIZER or the one scripts/fetch-data.sh fetched). Checked on every input:
//  - decode(encode(text)) == the text with invalid UTF-8 replaced by U+FFFD (byte-level BPE loses
//    nothing else), with and without special tokens;
//  - the two BPE merge algorithms (linear scan, heap) agree on the input as one piece;
//  - every id is inside the vocabulary.
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "core/errors.h"
#include "core/tokenizer.h"

namespace {
const flexcp::Tokenizer& llama3() {
  static const std::unique_ptr<flexcp::Tokenizer> tok = [] {
    const std::string path = flexcp::tokenizer_default_path();
    try {
      return std::make_unique<flexcp::Tokenizer>(flexcp::Tokenizer::load(path));
    } catch (const flexcp::UserError& e) {
      std::fprintf(stderr, "fuzz_tokenizer_text: %s\n", e.what());
      std::exit(3);  // not a finding: the tokenizer is missing (run scripts/fetch-data.sh)
    }
  }();
  return *tok;
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)llama3();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const flexcp::Tokenizer& tok = llama3();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string storage;
  const std::string expect(flexcp::utf8_sanitize(text, storage));
  for (bool special : {false, true}) {
    const auto ids = tok.encode(text, special);
    for (int32_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) std::abort();
    if (tok.decode(ids) != expect) std::abort();
  }
  if (size <= 256 && tokenizer_bpe_for_test(tok, text, false) != tokenizer_bpe_for_test(tok, text, true)) std::abort();
  return 0;
}
