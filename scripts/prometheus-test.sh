#!/usr/bin/env bash
# The metrics' acceptance test (io/tests/metrics.rs, prometheus_*): Debian's Prometheus server scrapes a
# real master and minion through a hunt, promtool checks every node's output, and every query of the
# Grafana dashboard (deploy/grafana/) must return data. Installs prometheus (with promtool) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "prometheus-test: installing prometheus (Debian's package: the server and promtool)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1
# --workspace: the same features as the test step, so nothing is rebuilt.
cargo test --workspace --test metrics -- --ignored --nocapture prometheus_
