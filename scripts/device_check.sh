#!/usr/bin/env bash
# On a Hopper GPU machine with no package registry: install fa3_jax from this working tree (with
# the nvidia-cutlass wheel brought along in .whl/), then run the GPU tests, compute-sanitizer on a
# small case, the kernel benchmark and the main job. Everything it writes goes to $OUT.
#   STAGES="build tests sanitizer bench overhead main" (default: all)   FA3_JAX_HEAD_DIMS=64,...
#   PYTEST_ARGS, BENCH_ARGS, MAIN_ARGS to narrow a stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_jax_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build tests sanitizer bench overhead main"}
# Without this XLA autotunes the reference GEMMs of every test and the suite takes many minutes.
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}
PY=${PYTHON:-python3}
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== $* ($(date +%T))"; }

if has build; then
  log "build"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  prebuilt=$(ls .whl/fa3_jax-*-cp312-*.whl 2>/dev/null | head -1)
  if [ -n "$prebuilt" ] && [ "${FROM_SOURCE:-0}" != 1 ]; then
    # A wheel built off-device from this tree (scripts/build_wheel_py312.sh): no device time spent
    # compiling. Its ptxas report is in the build log next to it.
    echo "installing prebuilt $prebuilt"
    "$PY" -m pip install -q --no-index --no-deps --force-reinstall "$prebuilt" || exit 1
    # The tree's Python layers replace the wheel's, so Python edits need no rebuild.
    site=$("$PY" -c "import fa3_jax, os; print(os.path.dirname(fa3_jax.__file__))")
    cp python/fa3_jax/*.py "$site"/
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/nvidia_cutlass-*.whl \
      || { echo "device_check: carry .whl with the nvidia-cutlass wheel"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
    FA3_JAX_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
    rc=$?
    grep -E "ptxas (info|warning)|C7508|error" "$OUT/build.log" | grep -v "^ *$" >"$OUT/ptxas.txt"
    grep -E "spill|C7508" "$OUT/ptxas.txt" | sort | uniq -c | sort -rn | head -20
    if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit $rc; fi
  fi
  so=$("$PY" -c "import fa3_jax._fa3_jax_ext as m; print(m.__file__)")
  cuobjdump --dump-sass "$so" >"$OUT/sass.txt" 2>&1
  echo "SASS: $(grep -c HGMMA "$OUT/sass.txt") HGMMA, $(grep -c -E 'LDL|STL' "$OUT/sass.txt") LDL/STL instructions"
  awk '/Function :/{f=$3} /HGMMA/{c[f]++} END{for (k in c) print c[k], k}' "$OUT/sass.txt" | sort -rn | head -20
  "$PY" -c "import fa3_jax; print('cuda_built', fa3_jax.cuda_built(), 'head dims', fa3_jax.cuda_head_dims())"
fi

if has tests; then
  log "GPU tests"
  # Every gpu-marked test but the multi-GPU file (test_gpu.py, decode, varlen, KV cache...).
  # Eight workers share the GPU(s) (compilation dominates); none preallocates the memory.
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -m gpu -ra -n ${PYTEST_WORKERS:-8} \
    ${PYTEST_ARGS:-} --ignore tests/test_multi_gpu.py tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
  # Multi-GPU tests (skip on one GPU) and the command-buffer test, in one process: they compare
  # devices with each other.
  nvidia-smi -L
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -s -m gpu -ra tests/test_multi_gpu.py \
    2>&1 | tee "$OUT/pytest_multi_gpu.txt" | tail -40
fi

if has sanitizer; then
  log "compute-sanitizer"
  # In parts by head dim (scripts/small_case.py: whole-script runs made compute-sanitizer itself
  # segfault on an H200 in session 14).
  dims=$("$PY" -c "import fa3_jax; print(' '.join(map(str, fa3_jax.cuda_head_dims())))")
  for tool in memcheck racecheck; do
    for d in $dims; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool $tool --error-exitcode 3 "$PY" scripts/small_case.py "$d" >"$OUT/sanitizer_${tool}_hdim$d.txt" 2>&1
      echo "$tool hdim $d rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_${tool}_hdim$d.txt" | tail -1)"
    done
  done
  # The FP8 kernels (the hdim 128 one transposes V in shared memory) and the paged KV-cache
  # decode path (16-row boxes, out-of-range page index).
  for case in fp8 paged; do
    for tool in memcheck racecheck; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool $tool --error-exitcode 3 "$PY" scripts/small_case_$case.py >"$OUT/sanitizer_${tool}_$case.txt" 2>&1
      echo "$tool $case rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_${tool}_$case.txt" | tail -1)"
    done
  done
fi

if has bench; then
  log "benchmark"
  "$PY" benchmarks/bench_attention.py --out "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -80
fi

if has overhead; then
  log "host overhead"
  "$PY" benchmarks/bench_host_overhead.py --json "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.txt"
fi

if has main; then
  log "main job"
  # Step times compare whole models: XLA must autotune their GEMMs (the flag above is for the
  # tests' reference GEMMs; with it a step of 16/4 heads x 128 took 485 ms instead of 21).
  XLA_FLAGS= "$PY" benchmarks/train_transformer.py --steps 50 --seq 1024 --batch 8 --heads 8 --kv-heads 2 \
    --head-dim 128 --layers 2 --lr 0.01 --json "$OUT/train.json" ${MAIN_ARGS:-} 2>&1 | tail -22
fi
log "done"
