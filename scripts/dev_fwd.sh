#!/usr/bin/env bash
# Build (here) and test (on the device machine) the sm90 forward kernel.
#   scripts/dev_fwd.sh build [HDIM]   compile the forward TUs (+ test driver) into devbin/fwd/
#   scripts/dev_fwd.sh device         on the GPU machine: SASS check, correctness, sanitizer, timing
set -euo pipefail
cd "$(dirname "$0")/.."
INC=$(bash scripts/cutlass_include.sh)
FLAGS=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
       --expt-extended-lambda -DNDEBUG -DFA3_JAX_WITH_CUDA -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -I"$INC")
OUT_DIR=devbin/fwd
case "${1:-build}" in
  build)
    mkdir -p "$OUT_DIR"
    defs=(); tag=all; hdims=(64 96 128 192 256)
    if [[ -n "${2:-}" ]]; then defs=(-DFA3_JAX_ONLY_HDIM="$2"); tag="$2"; hdims=("$2"); fi
    # The entry points, then one translation unit per head dim (flash_fwd_hdim<D>_sm90.cu).
    objs=("$OUT_DIR/fwd_api_$tag.o")
    nvcc "${FLAGS[@]}" "${defs[@]}" -c cpp/hopper/flash_fwd_sm90.cu -o "${objs[0]}"
    : > "$OUT_DIR/ptxas_$tag.txt"
    for d in "${hdims[@]}"; do
      nvcc "${FLAGS[@]}" "${defs[@]}" -Xptxas -v -c "cpp/hopper/flash_fwd_hdim${d}_sm90.cu" \
        -o "$OUT_DIR/fwd_${d}_$tag.o" 2>> "$OUT_DIR/ptxas_$tag.txt"
      objs+=("$OUT_DIR/fwd_${d}_$tag.o")
    done
    grep -E "Compiling entry|registers|spill" "$OUT_DIR/ptxas_$tag.txt" | sed 's/_ZN3fa34sm9021flash_fwd_kernel_sm90INS0_9FwdTraits//' || true
    if grep -q C7508 "$OUT_DIR/ptxas_$tag.txt"; then echo "WARNING: setmaxnreg ignored (C7508)"; fi
    nvcc "${FLAGS[@]}" -c cpp/hopper/test_fwd_sm90.cu -o "$OUT_DIR/test_fwd_sm90.o"
    nvcc -gencode=arch=compute_90a,code=sm_90a "$OUT_DIR/test_fwd_sm90.o" "${objs[@]}" \
      -o "$OUT_DIR/test_fwd_$tag"
    ;;
  device)
    BIN=${2:-$OUT_DIR/test_fwd_all}
    LOG=${OUT:-/tmp}
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader || true
    cuobjdump --dump-sass "$BIN" | grep -oE "HGMMA\.[0-9A-Za-z]+\.[A-Z0-9.]+|UTMALDG[.0-9A-Z]*|USETMAXREG[.A-Z0-9]*|\bLDL\b|\bSTL\b" \
      | sort | uniq -c | sort -rn | head -20 || true
    # Timeouts keep a hang from eating the whole lease.
    timeout 90 "$BIN" --check 2>&1 | tee "$LOG/check.txt" | grep -E "FAIL|SUMMARY" || echo "check rc=$?"
    timeout 40 compute-sanitizer --tool memcheck "$BIN" --small 2>&1 | tail -3 || true
    timeout 40 compute-sanitizer --tool racecheck --racecheck-report hazard "$BIN" --small 2>&1 | tail -3 || true
    timeout 60 "$BIN" --time 2>&1 | tee "$LOG/time.txt" || true
    # FP8 (e4m3) forward, where the build has FP8 head dims: check, then time (per-tensor descales).
    timeout 90 "$BIN" --check-fp8 2>&1 | grep -E "FAIL|SUMMARY" || echo "check-fp8 rc=$?"
    timeout 60 "$BIN" --time-fp8 2>&1 | tee "$LOG/time_fp8.txt" || true
    ;;
esac
