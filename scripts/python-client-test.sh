#!/usr/bin/env bash
# Runs the Python example (examples/python/talon_client.py: stock grpcio, stubs generated from
# proto/) against a real master and minion (io/tests/python_client.rs). Installs the example's
# pinned requirements into a virtualenv under target/ (kept between runs; reinstalled when
# requirements.txt changes), from the Python package index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "python-client-test: $python not found" >&2; exit 1; }
venv=target/python-client-venv
req=examples/python/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements.txt"; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.txt"
fi
"$venv/bin/python" -c 'import grpc; print("grpcio", grpc.__version__)'
TALON_PYTHON=$PWD/$venv/bin/python \
  cargo test --workspace --test python_client -- --ignored --test-threads 1
