#!/bin/sh
# Sets everything up (a virtual environment in .venv with motionctl and its dependencies),
# then runs the simulated treatment session or the tests.
#
#   ./run.sh              the simulated treatment session (motionctl sim); Ctrl-C stops it
#   ./run.sh test         the test suite (extra arguments go to pytest)
#   ./run.sh ARGS...      any other motionctl command, e.g. ./run.sh sim --seconds 20 --json
set -eu
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "run.sh: motionctl needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's declared dependencies change.
stamp=".venv/.motionctl-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install --disable-pip-version-check -q -e ".[dev]"
    rm -f .venv/.motionctl-*
    touch "$stamp"
fi

case "${1:-sim}" in
    test) shift; exec .venv/bin/python -m pytest "$@" ;;
    sim) [ $# -gt 0 ] && shift; exec .venv/bin/motionctl sim "$@" ;;
    *) exec .venv/bin/motionctl "$@" ;;
esac
