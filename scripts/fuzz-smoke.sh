#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS (default 20) each, on the stable toolchain
# (libFuzzer's coverage guidance without a sanitizer: `-s none` needs no nightly), starting from the
# committed corpus. New inputs go to a temporary directory, so the committed corpus is unchanged;
# a crash fails the run and leaves the input in fuzz/artifacts/<target>/ (add it to the corpus
# once fixed). Installs cargo-fuzz if it is missing.
#
# Built unoptimised (`--dev`): the optimised build took ~10 of CI's minutes, the unoptimised one
# ~3.5 (CI: the step took 267 s against 706 s). It runs about a tenth as many inputs (replication
# in CI: 45,832 in 21 s against 602,325), enough for a smoke run from the corpus. Fuzz for real
# with the optimised build (README).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
targets=$(cargo fuzz list)
cargo fuzz build -s none --dev
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  if ! cargo fuzz run -s none --dev "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  echo "$t: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)"
done
