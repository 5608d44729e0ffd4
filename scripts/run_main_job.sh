#!/usr/bin/env bash
# The main job: set up .venv, build fa3_jax, train a small Flax transformer with fa3_jax attention
# and with jax.nn.dot_product_attention; prints both loss curves and step times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python benchmarks/train_transformer.py "$@"
