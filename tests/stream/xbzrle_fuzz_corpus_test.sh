#!/bin/sh
# Runs the XBZRLE fuzz target (plain build) over its regression corpus.
set -eu
fuzz="$1"
corpus="$2"
n=$(find -L "$corpus" -type f | wc -l)
[ "$n" -gt 0 ] || { echo "empty corpus $corpus"; exit 1; }
exec "$fuzz" "$corpus"
