#!/usr/bin/env bash
# One command for every benchmark: `bench/run.sh` (full, writes docs/performance.md and
# docs/perf-*.png) or `bench/run.sh --quick` (CI smoke, < 3 min, writes bench/results/quick/).
# Extra arguments go to `python -m bench.run` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if { [ ! -d bench/socketio/node_modules/socket.io ] \
    || [ ! -d bench/socketio/node_modules/@socket.io/redis-adapter ]; } && command -v npm >/dev/null; then
    (cd bench/socketio && npm ci --no-audit --no-fund >/dev/null)
fi
exec "$VENV/bin/python" -m bench.run "$@"
