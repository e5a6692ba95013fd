#!/usr/bin/env bash
# Set up pyvhost-blk on a fresh Debian machine: system packages (needs root or sudo), then the
# Python package (compiles libvhost-user from Debian's QEMU source package into the extension).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
