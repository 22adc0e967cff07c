#!/bin/sh
# Runs the queue fuzz target (plain build) over its regression corpus.
set -eu
fuzz="$1"
corpus="$2"
exec "$fuzz" "$corpus"
