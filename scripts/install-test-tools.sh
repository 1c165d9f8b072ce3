#!/usr/bin/env bash
# Installs (with apt, only if missing) the system tools the endpoint-table tests compare Talon's
# tables with (io/src/query/tests.rs): ps (procps), ss and ip (iproute2), getent and the coreutils digests
# and stat (always on Debian), dpkg-query (dpkg).
set -euo pipefail
missing=()
command -v ps >/dev/null || missing+=(procps)
{ command -v ss >/dev/null && command -v ip >/dev/null; } || missing+=(iproute2)
for t in getent sha256sum md5sum sha1sum stat dpkg-query; do
  command -v "$t" >/dev/null || { echo "install-test-tools: $t is missing and not installable here" >&2; exit 1; }
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-tools: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "install-test-tools: ps, ss, getent, sha256sum, md5sum, sha1sum, stat, dpkg-query present (and ip)"
