#!/usr/bin/env bash
# Set up pyvhost-blk on a fresh Debian machine: system packages (needs root or sudo), then the
# project's virtualenv (.venv, see scripts/venv.sh) with the Python package installed in it
# (compiles libvhost-user from Debian's QEMU source package into the extension).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
. scripts/venv.sh
venv_ensure
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PY" -c 'import vhost._vhost_user' || {
    echo "setup: the extension vhost._vhost_user did not build (see the pip output above)" >&2
    exit 1
}
