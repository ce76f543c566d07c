#!/usr/bin/env bash
# Set up if needed, then run every check CI runs: ruff, mypy --strict, the import contracts
# (lint-imports, see pyproject.toml), and the test suite
# (real QEMU processes, real qcow2 chains, the agent as a real process against the in-process
# Kubernetes API stand-in). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k cli`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check operator tests benchmarks
ruff format --check operator tests benchmarks
mypy
lint-imports --no-cache
pytest "$@"
