#!/usr/bin/env bash
# Set up and run the whole test suite (unit, component, e2e with real vLLM engines).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/unit/test_deploy.py renders Kubernetes objects (kubectl kustomize) and checks systemd
# units (systemd-analyze); the machine image has both, install them where it does not
if [ "$(id -u)" = 0 ] && ! { command -v kubectl && command -v systemd-analyze; } >/dev/null; then
  apt-get update -qq && apt-get install -y -qq kubernetes-client systemd >/dev/null || true
fi
exec .venv/bin/python -m pytest -v -p no:cacheprovider --durations=15 tests "$@"
