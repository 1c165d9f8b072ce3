#!/usr/bin/env bash
# Dependency-tree rules that the compiler cannot enforce:
# 1. talon-core is sans-IO: no async runtime, socket, event-loop, gRPC transport or RNG crate.
# 2. The production binary (talon-io) carries no simulation or test-only crate.
# Fails naming the offending crates.
set -euo pipefail
cd "$(dirname "$0")/.."

check() { # package, regex of forbidden crate names, why
  local tree bad
  tree=$(cargo tree -p "$1" -e normal --prefix none --format '{p}')
  bad=$(grep -E "^($2) " <<<"$tree" | sort -u || true)
  if [ -n "$bad" ]; then
    echo "$1's dependency tree must not contain these crates ($3):" >&2
    echo "$bad" >&2
    exit 1
  fi
  echo "$1: $(sort -u <<<"$tree" | wc -l | tr -d ' ') crates in its normal tree; none forbidden ($3)"
}

check talon-core 'tokio|tokio-[a-z-]+|mio|socket2|hyper|tonic|h2|async-std|smol|rand|rand_core|getrandom' \
  "it is sans-IO and deterministic"
check talon-io 'turmoil|proptest|talon-sim|libfuzzer-sys' "the production binary carries no test-only crate"
