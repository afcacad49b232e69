// `flexcp tokenize "some text"`: the ids and pieces of a text (or of a file, or stdin), and
// `--decode ID...` for the way back.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "app/command_registry.h"
#include "core/errors.h"
#include "core/tokenizer.h"

namespace flexcp {
namespace {

// A piece as a quoted, escaped literal: printable UTF-8 as is; control bytes, and bytes that do
// not form a whole character (a piece may cut a character in two), as \xNN.
std::string piece_literal(const std::string& bytes) {
  std::string out = "'";
  std::string storage;
  int64_t replaced = 0;
  utf8_sanitize(bytes, storage, &replaced);
  for (unsigned char c : bytes) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c == '\\') out += "\\\\";
    else if (c == '\'') out += "\\'";
    else if (c < 0x20 || c == 0x7f || (c >= 0x80 && replaced)) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out += char(c);
    }
  }
  return out + "'";
}

struct TokenizeArgs {
  std::vector<std::string> texts;
  std::string file;
  std::string tokenizer;
  std::vector<int64_t> decode;
  bool allow_special = false;
  bool ids_only = false;
};

void run_tokenize(const TokenizeArgs& a) {
  Tokenizer tok = Tokenizer::load(a.tokenizer.empty() ? tokenizer_default_path() : a.tokenizer);
  if (!a.decode.empty()) {
    std::vector<int32_t> ids;
    for (int64_t id : a.decode) {
      if (id < 0 || id >= tok.vocab_size())
        fail("--decode", "id " + std::to_string(id) + " is outside [0, " + std::to_string(tok.vocab_size()) + ")");
      ids.push_back(int32_t(id));
    }
    std::cout << tok.decode(ids) << "\n";
    return;
  }
  std::string text;
  if (!a.file.empty()) {
    if (a.file == "-") {
      text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    } else {
      std::ifstream in(a.file, std::ios::binary);
      if (!in) fail(a.file, "cannot open for reading", "check the path");
      text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  } else {
    if (a.texts.empty()) fail("tokenize", "no text", "give a text, e.g. flexcp tokenize \"Hello world\", or --file PATH");
    for (size_t i = 0; i < a.texts.size(); ++i) text += (i ? " " : "") + a.texts[i];
  }
  std::string storage;
  int64_t replaced = 0;
  utf8_sanitize(text, storage, &replaced);
  std::vector<int32_t> ids = tok.encode(text, a.allow_special);
  if (a.ids_only) {
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n";
    return;
  }
  std::cout << ids.size() << " tokens, " << text.size() << " bytes";
  if (replaced) std::cout << " (" << replaced << " invalid UTF-8 sequences replaced by U+FFFD)";
  std::cout << "\n";
  for (int32_t id : ids) {
    char b[16];
    std::snprintf(b, sizeof b, "%8d  ", id);
    std::cout << b << piece_literal(tok.token_bytes(id)) << "\n";
  }
}

void setup_tokenize(CLI::App& sub) {
  auto a = std::make_shared<TokenizeArgs>();
  sub.add_option("text", a->texts, "Text to encode (several words are joined by spaces)");
  sub.add_option("--file", a->file, "Encode this file's bytes instead ('-' reads stdin)");
  sub.add_option("--tokenizer", a->tokenizer, "HF tokenizer.json (default: $FLEXCP_TOKENIZER or the cached Llama 3 one)");
  sub.add_flag("--allow-special", a->allow_special, "Turn special-token text such as <|begin_of_text|> into its id");
  sub.add_flag("--ids-only", a->ids_only, "Print only the ids, on one line");
  sub.add_option("--decode", a->decode, "Decode these ids to text instead");
  sub.callback([a] { run_tokenize(*a); });
}

CommandRegistration reg("tokenize", "Show the Llama 3 token ids and pieces of a text", setup_tokenize);

}  // namespace
}  // namespace flexcp
