#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into test/fuzz/corpus/<target>/ (stdlib only).
Seeds are small valid inputs (and a few near misses) so that the fuzzer starts past the outer checks.
libFuzzer adds what it finds next to them when run with test/fuzz/run.sh --merge."""
import json, os, struct, pathlib

root = pathlib.Path(__file__).resolve().parent / "corpus"
repo = pathlib.Path(__file__).resolve().parents[2]


def put(target, name, data):
    d = root / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, meta=None):
    header, buf = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + buf


put("safetensors", "two_f32", safetensors({"a": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
                                           "b": ("BF16", [3], b"\x80\x3f" * 3)}, {"format": "pt"}))
put("safetensors", "empty_tensor", safetensors({"e": ("I64", [0, 5], b""), "x": ("U8", [1], b"\x07")}))
put("safetensors", "scalar", safetensors({"s": ("F64", [], struct.pack("<d", 2.5))}))
put("safetensors", "no_tensors", safetensors({}, {"k": "v"}))
put("safetensors", "truncated", safetensors({"a": ("F32", [4], b"\0" * 16)})[:-3])

def shard(magic, version, tokens, fmt):
    hdr = struct.pack("<256i", magic, version, len(tokens), *([0] * 253))
    return hdr + struct.pack("<%d%s" % (len(tokens), fmt), *tokens)

put("shard", "llama3", shard(20240801, 7, [128000, 1, 2, 3, 128001], "I"))
put("shard", "gpt2", shard(20240520, 1, [50256, 10, 20], "H"))
put("shard", "empty", shard(20240801, 7, [], "I"))
put("shard", "bad_count", shard(20240801, 7, [1, 2], "I")[:-4])

manifest = {
    "format": "flexcp-token-shards", "format_version": 1, "created_by": "flexcp 0.1.0",
    "tokenizer": {"name": "llama3 byte-level BPE (128256 ids)", "sha256": "ab" * 32, "vocab_size": 128256,
                  "bos_id": 128000, "eos_id": 128001},
    "shard_format": {"magic": 20240801, "version": 7, "header_bytes": 1024, "token_bytes": 4},
    "splits": {"train": {"shards": 1, "tokens": 10, "documents": 2}, "val": {"shards": 1, "tokens": 5, "documents": 1}},
    "shards": [{"file": "train_000000.bin", "split": "train", "tokens": 10, "documents": 2, "max_token_id": 128001, "sha256": "cd" * 32},
               {"file": "val_000000.bin", "split": "val", "tokens": 5, "documents": 1, "max_token_id": 99, "sha256": "ef" * 32}],
    "prepare": {"inputs": ["a.txt"], "seed": 1},
}
put("manifest", "valid", json.dumps(manifest, indent=1))
bad = dict(manifest); bad["format_version"] = "1"
put("manifest", "string_version", json.dumps(bad))
bad = dict(manifest); bad["shards"] = [{"file": "../x", "split": "train"}]
put("manifest", "bad_shard", json.dumps(bad))

for f in sorted((repo / "configs").glob("*.yaml")):
    put("config", f.stem, f.read_bytes())
put("config", "small_with_sets", "model:\n  preset: tiny\ntrain:\n  steps: 3\n  seq_len: 32\n\0train.lr=1e-3\nmodel.arch.num_layers=1\n")
put("config", "synthetic", "data:\n  synthetic: true\ntrain:\n  global_batch: 4\n  micro_batch: 2\ncheckpoint:\n  every: 1\n  keep_last: 2\n")

# A tiny byte-level BPE tokenizer.json in the Llama 3 layout (GPT-2 byte-to-unicode alphabet).
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))

b2u = bytes_to_unicode()
vocab = {b2u[b]: b for b in range(256)}
merges = []
for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("\u0120", "w")]:
    vocab[a + b] = len(vocab)
    merges.append(f"{a} {b}")
tok = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": len(vocab), "content": "<|begin_of_text|>", "special": True},
                     {"id": len(vocab) + 1, "content": "<|end_of_text|>", "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "post_processor": None, "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
              "vocab": vocab, "merges": merges},
}
put("tokenizer_json", "tiny_bpe", json.dumps(tok))
tok2 = json.loads(json.dumps(tok)); tok2["model"]["merges"] = [m.split(" ") for m in merges]; tok2["model"]["ignore_merges"] = False
put("tokenizer_json", "tiny_bpe_pairs", json.dumps(tok2))

for i, text in enumerate(["Hello world!", "<|begin_of_text|>Hi<|end_of_text|>", "  \t\n\r\n 12345 don't",
                          "\u00e9t\u00e9 \u20ac \U0001F600 \u4e2d\u6587", "\xff\xfe\xc3(bad utf8\xe2\x82", "a" * 300]):
    put("tokenizer_text", f"text{i}", text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
put("tokenizer_text", "invalid_utf8", b"\xff\xfe\xc3(bad \xe2\x82 \xf0\x9f\x98 end")

put("attention_spec", "causal", bytes([0, 8, 8, 0, 8, 0, 8, 1]))
put("attention_spec", "two_docs", bytes([0, 10, 10, 0, 4, 0, 4, 1, 4, 10, 4, 10, 1]))
put("attention_spec", "cp_rank", bytes([0, 4, 12, 0, 4, 0, 8, 0, 0, 4, 8, 12, 1]))
put("attention_spec", "overlap", bytes([0, 8, 8, 0, 8, 0, 8, 0, 2, 3, 2, 3, 2]))
put("attention_spec", "raw", bytes([1]) + struct.pack("<qq", 16, 16) + struct.pack("<qqqq", 0, 16, 0, 16) + b"\x01")
