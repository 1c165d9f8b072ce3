#!/usr/bin/env bash
# The GUI's end-to-end tests in a real browser (io/tests/gui_browser.rs drives
# io/tests/browser/gui.test.mjs against a real master, minion and agents). Installs what they need,
# idempotently: Debian's Chromium (apt-get, when it is missing) and the test's pinned node package
# (playwright-core, `npm ci` from io/tests/browser/package-lock.json; it downloads no browser).
set -euo pipefail
cd "$(dirname "$0")/.."
chromium=${TALON_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root=sudo
  $as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q chromium
fi
"$chromium" --version
command -v node >/dev/null || { echo "browser-test: node (20 or newer) not found" >&2; exit 1; }
node --version
(cd io/tests/browser && npm ci --no-audit --no-fund --loglevel=error)
# --workspace, as the test step builds: one package alone unifies features differently and
# rebuilds everything.
TALON_CHROMIUM=$chromium cargo test --workspace --test gui_browser -- --ignored --test-threads 1
