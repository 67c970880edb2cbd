#!/usr/bin/env bash
# Set up (first run: ~7 min) and start a local cluster: scheduler, 1 prefill worker,
# 1 decode worker and the OpenAI frontend on http://127.0.0.1:8000, serving the bundled
# SmolLM2-135M-Instruct. Extra arguments go to `pdserve serve` (see --help). Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pdserve serve "$@"
