#!/usr/bin/env bash
# Set up everything and run the whole test suite (unit, libblkio integration, QEMU guest e2e,
# reliability, operations: libvirt, systemd, Prometheus).
# Extra arguments go to pytest, e.g.  scripts/test.sh -k libblkio
set -euo pipefail
cd "$(dirname "$0")/.."
PYVHOST_BLK_EXTRA_DEPS=1 bash scripts/setup.sh
. scripts/venv.sh
export PATH="$VENV/bin:$PATH"  # what activating the venv does: tests run pyvhost-blk by name
echo "== guest image"
bash qemu-configs/build-guest.sh
echo "== ruff"
"$PY" -m ruff check .
echo "== pytest"
exec "$PY" -m pytest -v "$@"
