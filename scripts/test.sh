#!/usr/bin/env bash
# Set up and run the whole test suite (unit, component, e2e with real vLLM engines).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -v -p no:cacheprovider --durations=15 tests "$@"
