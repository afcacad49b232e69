#!/usr/bin/env python3
"""Tokenizer throughput: flexcp vs HF `tokenizers` vs `tiktoken` on the same corpus.

Called by scripts/bench/tokenizer.sh (which builds the flexcp bench binary). Steps:
  1. load the corpus (JSON arrays of documents), repeat it --repeat-corpus times;
  2. exactness: ids of every base document from flexcp and from HF must be equal (tiktoken's
     agreement with HF is printed too, for information);
  3. throughput in MB/s of UTF-8 input, single thread and all cores, best of --repeat runs;
  4. a table and one JSON line ("RESULT {...}") with the figures and ratios.
HF runs in a subprocess per thread count (RAYON_NUM_THREADS is read once per process) and uses the
fastest batch call it has (encode_batch_fast when present) on a copy of the tokenizer without added
tokens, so that all three do the same work: plain text to ids, no special-token scan.
"""
import argparse
import glob
import json
import os
import struct
import subprocess
import sys
import time


def load_docs(corpus_dir):
    docs = []
    for path in sorted(glob.glob(os.path.join(corpus_dir, "*.json"))):
        docs += json.load(open(path, encoding="utf-8"))
    return docs


def hf_plain(tokenizer_path):
    from tokenizers import Tokenizer
    spec = json.load(open(tokenizer_path, encoding="utf-8"))
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def tiktoken_encoding(tokenizer_path):
    import tiktoken
    from tokenizers import Tokenizer
    spec = json.load(open(tokenizer_path, encoding="utf-8"))
    # byte-level alphabet -> bytes
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(bs, cs)}
    ranks = {bytes(to_byte[ch] for ch in tok): i for tok, i in spec["model"]["vocab"].items()}
    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    special = {a["content"]: a["id"] for a in spec["added_tokens"]}
    return tiktoken.Encoding(name="llama3-bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def hf_worker(args):
    """Subprocess: time HF on the docs file with the thread count set in the environment."""
    tok = hf_plain(args.tokenizer)
    docs = json.load(open(args.docs, encoding="utf-8"))
    fn = getattr(tok, "encode_batch_fast", None)
    name = "encode_batch_fast"
    if fn is None:
        fn, name = tok.encode_batch, "encode_batch"
    fn(docs[:1000], add_special_tokens=False)  # warm-up
    best = 1e30
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = fn(docs, add_special_tokens=False)
        best = min(best, time.perf_counter() - t)
    tokens = sum(len(e.ids) for e in out)
    print(json.dumps({"seconds": best, "tokens": tokens, "method": name}))


def time_tiktoken(enc, docs, threads, repeat):
    enc.encode_ordinary_batch(docs[:1000], num_threads=threads)
    best = 1e30
    for _ in range(repeat):
        t = time.perf_counter()
        out = enc.encode_ordinary_batch(docs, num_threads=threads)
        best = min(best, time.perf_counter() - t)
    return best, sum(len(x) for x in out)


def read_ids(path):
    data = open(path, "rb").read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        out.append(list(struct.unpack_from(f"<{n}I", data, i)))
        i += 4 * n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--corpus", help="folder of JSON arrays of documents")
    ap.add_argument("--bench-bin", help="flexcp tokenizer_bench binary")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-corpus", type=int, default=4)
    ap.add_argument("--prepare-repeat", type=int, default=4,
                    help="prepare-data reads the benchmark corpus this many times over (fixed costs such as "
                         "the 0.6 s tokenizer load must not dominate)")
    ap.add_argument("--workdir", default="/tmp/flexcp-tokenizer-bench")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--docs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)

    import tiktoken
    import tokenizers
    os.makedirs(args.workdir, exist_ok=True)
    base = load_docs(args.corpus)
    docs = base * args.repeat_corpus
    base_path = os.path.join(args.workdir, "base.json")
    docs_path = os.path.join(args.workdir, "docs.json")
    json.dump(base, open(base_path, "w", encoding="utf-8"))
    json.dump(docs, open(docs_path, "w", encoding="utf-8"))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(base)} documents x{args.repeat_corpus} = {mb:.1f} MB; cores {os.cpu_count()}; "
          f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}", flush=True)

    # 1. exactness on the base corpus
    hf = hf_plain(args.tokenizer)
    hf_ids = [e.ids for e in hf.encode_batch(base, add_special_tokens=False)]
    ids_path = os.path.join(args.workdir, "flexcp_ids.bin")
    subprocess.run([args.bench_bin, args.tokenizer, base_path, "--threads", "1", "--repeat", "1",
                    "--ids-out", ids_path], check=True, stdout=subprocess.DEVNULL)
    ours = read_ids(ids_path)
    bad = [i for i in range(len(base)) if ours[i] != hf_ids[i]]
    enc = tiktoken_encoding(args.tokenizer)
    tk_ids = enc.encode_ordinary_batch(base, num_threads=args.threads)
    tk_bad = sum(1 for i in range(len(base)) if tk_ids[i] != hf_ids[i])
    print(f"exactness: flexcp vs HF: {len(base) - len(bad)}/{len(base)} documents identical; "
          f"tiktoken vs HF: {len(base) - tk_bad}/{len(base)}", flush=True)
    for i in bad[:5]:
        print(f"  doc {i}: {base[i][:120]!r}\n    hf:     {hf_ids[i][:40]}\n    flexcp: {ours[i][:40]}")

    # 2. throughput
    rows = {}
    out = subprocess.run([args.bench_bin, args.tokenizer, docs_path, "--threads", f"1,{args.threads}",
                          "--repeat", str(args.repeat)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        r = json.loads(line)
        rows[("flexcp", r["threads"])] = (r["seconds"], r["tokens"])
    for t in (1, args.threads):
        env = dict(os.environ, RAYON_NUM_THREADS=str(t), TOKENIZERS_PARALLELISM="true")
        r = json.loads(subprocess.run([sys.executable, __file__, "--hf-worker", "--tokenizer", args.tokenizer,
                                       "--docs", docs_path, "--repeat", str(args.repeat)],
                                      env=env, check=True, capture_output=True, text=True).stdout)
        rows[("hf", t)] = (r["seconds"], r["tokens"])
        hf_method = r["method"]
        rows[("tiktoken", t)] = time_tiktoken(enc, docs, t, args.repeat)

    result = {"corpus_mb": round(mb, 2), "threads": args.threads, "hf_method": hf_method,
              "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
              "exact_docs": len(base) - len(bad), "docs": len(base)}
    print(f"\n{'library':<10} {'threads':>7} {'MB/s':>9} {'Mtok/s':>8} {'scaling':>8}")
    for lib in ("flexcp", "hf", "tiktoken"):
        for t in (1, args.threads):
            sec, tok = rows[(lib, t)]
            mbs = mb / sec
            result[f"{lib}_{t}t_mb_s"] = round(mbs, 2)
            scale = (rows[(lib, 1)][0] / sec) if t != 1 else 1.0
            print(f"{lib:<10} {t:>7} {mbs:>9.2f} {tok / sec / 1e6:>8.2f} {scale:>7.2f}x")
        result[f"{lib}_scaling"] = round(rows[(lib, 1)][0] / rows[(lib, args.threads)][0], 2)
    # 3. prepare-data end to end (read .jsonl, tokenize, write shards + manifest)
    jsonl = os.path.join(args.workdir, "docs.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for _ in range(args.prepare_repeat):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    out = subprocess.run([args.bench_bin, args.tokenizer, jsonl, "--prepare", os.path.join(args.workdir, "shards"),
                          "--threads", f"1,{args.threads}"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        r = json.loads(line)
        t = r["prepare_threads"]
        result[f"prepare_{t}t_mb_s"] = round(r["mb_per_s"], 2)
        print(f"{'prepare':<10} {t:>7} {r['mb_per_s']:>9.2f} {r['tokens_per_s'] / 1e6:>8.2f}   (flexcp prepare-data, .jsonl in, shards out)")
    for other in ("hf", "tiktoken"):
        for t in (1, args.threads):
            ratio = rows[(other, t)][0] / rows[("flexcp", t)][0]
            result[f"flexcp_over_{other}_{t}t"] = round(ratio, 2)
            print(f"flexcp / {other} at {t} thread(s): {ratio:.2f}x")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
