#!/usr/bin/env bash
# talon-core must stay sans-IO: its normal dependency tree may hold no async runtime, no socket or
# event-loop crate, and no gRPC transport. Fails naming the offending crate.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree -p talon-core -e normal --prefix none --format '{p}')
bad=$(grep -E '^(tokio|tokio-[a-z-]+|mio|socket2|hyper|tonic|h2|async-std|smol|rand|getrandom) ' <<<"$tree" | sort -u || true)
if [ -n "$bad" ]; then
  echo "talon-core's dependency tree must not contain these crates (it is sans-IO):" >&2
  echo "$bad" >&2
  exit 1
fi
echo "talon-core dependency tree: $(wc -l <<<"$tree" | tr -d ' ') entries, no runtime, socket or RNG crate"
