#!/usr/bin/env bash
# Creates .venv (if missing) and installs fa3_jax from this working tree with its dev tools.
# Used by the README's two commands. Without a visible GPU the CUDA kernels are not built (a long
# nvcc build nobody could run); set FA3_JAX_CUDA=ON/OFF/AUTO to choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r scripts/requirements-dev.txt
# Header-only use: the wheel's own dependencies (cuda-python, scipy, ...) are not needed.
python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
if [ -z "${FA3_JAX_CUDA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    export FA3_JAX_CUDA=AUTO
  else
    export FA3_JAX_CUDA=OFF
  fi
fi
echo "fa3_jax: building (FA3_JAX_CUDA=$FA3_JAX_CUDA)"
python -m pip install -q --no-build-isolation --no-deps .
