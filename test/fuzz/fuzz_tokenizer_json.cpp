// libFuzzer target: Tokenizer::load on an arbitrary tokenizer.json. Bad files are UserErrors; a file
// that loads must encode and decode text without crashing, and its BPE algorithms must agree.
#include "core/errors.h"
#include "core/tokenizer.h"
#include "test/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = flexcp_fuzz::scratch_write("tokenizer_json", data, size);
  try {
    const flexcp::Tokenizer tok = flexcp::Tokenizer::load(path);
    for (const char* text : {"Hello world! 123", "  tabs\tand\nnewlines\r\n", "\xc3\xa9t\xc3\xa9 \xe2\x82\xac", "\xff\xfe bad"}) {
      const auto ids = tok.encode(text, /*allow_special=*/true);
      (void)tok.decode(ids);
      if (tokenizer_bpe_for_test(tok, text, false) != tokenizer_bpe_for_test(tok, text, true)) std::abort();
    }
    (void)tok.vocab_size();
  } catch (const flexcp::UserError&) {
  }
  return 0;
}
