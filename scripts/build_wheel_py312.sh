#!/usr/bin/env bash
# Builds a CPython 3.12 wheel with the Hopper kernels on this (GPU-less) machine, for the device
# machine (Python 3.12, no registry), so that no device time goes to compiling. Writes the wheel
# and its build log (ptxas report) into .whl/.   Needs pyenv's 3.12 and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(ls -d ~/.pyenv/versions/3.12*/bin/python | head -1)}
VENV=${VENV312:-/tmp/fa3_venv312}
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q jax==0.10.2 jaxlib==0.10.2 nanobind==3.1.0 scikit-build-core==1.1.2 cmake ninja
"$VENV/bin/pip" install -q --no-deps nvidia-cutlass==4.2.0.0
mkdir -p .whl
rm -f .whl/fa3_jax-*-cp312-*.whl
FA3_JAX_CUDA=ON "$VENV/bin/pip" wheel -v --no-build-isolation --no-deps . -w .whl \
  -C build-dir=build/py312-cuda >.whl/build_py312.log 2>&1
grep -E "spill stores|C7508" .whl/build_py312.log | sort | uniq -c || true  # none: an incremental build compiled no kernel
ls -la .whl/fa3_jax-*-cp312-*.whl
