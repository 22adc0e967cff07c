#!/bin/sh
# Runs the page-record fuzz target (plain build) over its regression corpus.
set -eu
exec "$1" "$2"
