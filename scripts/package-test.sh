#!/usr/bin/env bash
# The packages' acceptance test (io/tests/package.rs): `talon package deb` for a master, a minion and
# the agent, checked with dpkg-deb, lintian, installs into scratch roots with `dpkg --root`, and
# `systemd-analyze verify`. Installs lintian (and systemd's tools) if missing. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v useradd >/dev/null || missing+=(passwd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "package-test: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
lintian --version
# --workspace: the same features as the test step, so nothing is rebuilt.
cargo test --workspace --test package -- --ignored --nocapture
