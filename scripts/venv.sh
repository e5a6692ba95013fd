# Sourced by the scripts: the project's virtualenv, made with Debian's own Python.
#
# Debian marks its Python as externally managed (PEP 668), so pyvhost-blk never installs into
# it: it lives in a virtualenv, by default .venv in the checkout (PYVHOST_BLK_VENV moves it).
# The venv is created from /usr/bin/python3 (Debian's, whatever python3 is first on PATH) with
# --system-site-packages, so that Debian's Python bindings of system libraries (python3-libnbd,
# python3-rbd) are importable beside what pip installs.  After sourcing: $VENV and $PY.

VENV=${PYVHOST_BLK_VENV:-$PWD/.venv}
BASE_PY=${PYVHOST_BLK_BASE_PYTHON:-/usr/bin/python3}
PY=$VENV/bin/python

venv_ensure() {
    if [ -x "$PY" ] && "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
        return 0
    fi
    if [ ! -x "$BASE_PY" ]; then
        echo "setup: $BASE_PY not found: install Debian's python3 and python3-venv (scripts/install-deps.sh)" >&2
        return 1
    fi
    rm -rf "$VENV"
    echo "== virtualenv $VENV (from $BASE_PY)"
    if ! "$BASE_PY" -m venv --system-site-packages "$VENV"; then
        echo "setup: '$BASE_PY -m venv' failed: install python3-venv (apt-get install python3-venv)" >&2
        return 1
    fi
}
