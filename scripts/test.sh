#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the whole test suite: lint, types, unit,
# integration, cluster (real processes, real Consul and coturn), browser (Chromium), and a
# short smoke run of the benchmarks and of the Locust scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

VENV=.venv
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/pytest" -q -p no:cacheprovider tests
echo "== bench smoke"
bash bench/run.sh --quick --out "$(mktemp -d)"
echo "== locust smoke"
bash load/smoke.sh
echo "signalpost: all tests passed"
