#!/usr/bin/env bash
# Runs the tests that need a real network filesystem (io/tests/network_volume.rs) on an sshfs mount
# whose link delays each direction by ONE_WAY_MS (default 12: a stat ~50 ms, a rename ~75 ms, as on
# NFS/EFS), then unmounts it. The mount is made by `slowfs` (sshfs to a private sshd on loopback
# through a delaying TCP proxy; it installs sshfs and openssh-server with apt if missing), found at
# $TALON_SLOWFS or in the workplace's shared tools. To reproduce it by hand elsewhere: any sshfs
# mount with `-o cache=no,dir_cache=no,attr_timeout=0,entry_timeout=0,negative_timeout=0` through a
# link with that latency, then TALON_NETWORK_VOLUME=DIR TALON_NETWORK_VOLUME_RTT_MS=N
# cargo test --workspace --test network_volume -- --ignored (--workspace: the same build as the
# README's test command, so nothing is compiled again).
set -euo pipefail
cd "$(dirname "$0")/.."
one_way=${1:-12}
slowfs=${TALON_SLOWFS:-}
if [ -z "$slowfs" ]; then
  for c in ../shared/tools/slowfs ../../shared/tools/slowfs /work/shared/tools/slowfs; do
    if [ -x "$c" ]; then slowfs=$c; break; fi
  done
fi
if [ -z "$slowfs" ] || [ ! -x "$slowfs" ]; then
  echo "network-volume-test: no slowfs tool found (set TALON_SLOWFS=PATH)" >&2
  exit 1
fi
if [ ! -e /dev/fuse ]; then
  echo "network-volume-test: /dev/fuse is missing: this machine cannot mount a FUSE filesystem" >&2
  exit 1
fi
# A port of its own, so that a mount someone already has (default port 2398) is left alone.
export SLOWFS_PORT=${SLOWFS_PORT:-2478}
work=$(mktemp -d)
mnt=$work/mnt
export SLOWFS_STATE=$work/state
cleanup() { "$slowfs" down "$mnt" >/dev/null 2>&1 || true; rm -rf "$work" 2>/dev/null || true; }
trap cleanup EXIT
"$slowfs" up "$mnt" "$one_way"
TALON_NETWORK_VOLUME=$mnt TALON_NETWORK_VOLUME_RTT_MS=$((2 * one_way)) \
  cargo test --workspace --test network_volume -- --ignored --test-threads 1
