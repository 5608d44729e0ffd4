#!/usr/bin/env bash
# The main job: set up .venv, build fa3_jax, train a small Flax transformer with fa3_jax attention,
# with jax.nn.dot_product_attention (XLA) and, on an NVIDIA GPU, with cuDNN; prints the loss curves
# and step times of each (on CPU it says cuDNN is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python benchmarks/train_transformer.py "$@"
