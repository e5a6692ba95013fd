#!/usr/bin/env bash
# Set up everything and run the whole test suite (unit, libblkio integration, QEMU guest e2e).
# Extra arguments go to pytest, e.g.  scripts/test.sh -k libblkio
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
echo "== guest image"
bash qemu-configs/build-guest.sh
echo "== ruff"
"$PY" -m ruff check .
echo "== pytest"
exec "$PY" -m pytest -v "$@"
