#!/usr/bin/env bash
# Install the project into ./.venv (or into the active virtual environment).
#
# PyTorch: an installed torch is kept as it is (a CUDA build stays a CUDA build). Without one,
# a machine with an NVIDIA GPU gets the default build, and a machine without one gets the CPU
# build (TORCH_SPEC, default torch==2.13.0). Set TORCH_INDEX_URL to install torch from another
# package index, e.g. PyTorch's CPU-only index.
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="${TORCH_SPEC:-torch>=2.5}"
  else
    spec="${TORCH_SPEC:-torch==2.13.0}"
  fi
  echo "installing $spec"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "$spec"
  fi
fi

"${PIP[@]}" -e ".[test,peers,hf]"
"$PY" -c "import torch, attention_variants; print('torch', torch.__version__, '| variants:', ', '.join(attention_variants.list_variants()))"
