#!/usr/bin/env bash
# fa3_jax Hopper backward dev loop.
#   scripts/dev_bwd.sh build [HDIM]   compile here into devbin/ (all head dims, or -DFA3_JAX_ONLY_HDIM=HDIM)
#   scripts/dev_bwd.sh sass           HGMMA count, local-memory (LDL/STL) count per object, ptxas summary
#   scripts/dev_bwd.sh device [MODE]  on the GPU machine: run devbin/test_bwd_sm90 MODE, time devbin/*/test_bwd_sm90,
#                                     then compute-sanitizer on small cases
# Device call (from the repo root, via the run tool): carry=["devbin"], command "scripts/dev_bwd.sh device".
set -euo pipefail
cd "$(dirname "$0")/.."
CUTLASS_INC=$(bash scripts/cutlass_include.sh)
NVCC_FLAGS=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr --expt-extended-lambda
            -I"$CUTLASS_INC" -Icpp -Icpp/hopper -DFA3_JAX_WITH_CUDA -Xptxas -v)
cmd=${1:-build}
case "$cmd" in
  build)
    mkdir -p devbin
    defs=()
    if [[ -n "${2:-}" ]]; then defs+=(-DFA3_JAX_ONLY_HDIM="$2"); fi
    srcs=(cpp/hopper/flash_bwd_sm90.cu cpp/hopper/flash_bwd_hdim*_sm90.cu cpp/hopper/test_bwd_sm90.cu)
    pids=()
    for s in "${srcs[@]}"; do
      o=devbin/$(basename "${s%.cu}").o
      # Skip objects newer than their source and every header (FORCE=1 rebuilds all).
      if [[ -z "${FORCE:-}" && -z "${2:-}" && -f "$o" && -z "$(find "$s" cpp/hopper/flash_bwd*.h cpp/flash.h -newer "$o")" ]]; then continue; fi
      nvcc "${NVCC_FLAGS[@]}" "${defs[@]}" -c "$s" -o "$o" > "$o.log" 2>&1 &
      pids+=($!)
      while (( $(jobs -rp | wc -l) >= ${JOBS:-2} )); do sleep 1; done
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    if (( rc )); then grep -h -B2 -A3 "error" devbin/*.log | head -60; exit 1; fi
    nvcc -gencode=arch=compute_90a,code=sm_90a -o devbin/test_bwd_sm90 devbin/*.o
    grep -h "warning" devbin/*.log | grep -v "^$" | sort -u | head -20 || true
    echo "built devbin/test_bwd_sm90"
    ;;
  sass)
    # cuobjdump/nvdisasm: the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels work if no CUDA bin has them.
    # ptxas reports the entry register count (168 = 65536 / 384); consumers run at 240 via setmaxnreg.
    for o in devbin/flash_bwd_hdim*_sm90.o; do
      sass=$(cuobjdump --dump-sass "$o")
      echo "$o: HGMMA $(grep -c HGMMA <<<"$sass") LDL/STL $(grep -cE 'LDL|STL' <<<"$sass")"
    done
    grep -h -A3 "Compiling entry function '.*flash_bwd_kernel" devbin/*.log | grep -E "Compiling|spill|Used" \
      | sed -E "s/.*BwdTraitsSm90ILi([0-9]+)ELi([0-9]+)EN7cutlass[0-9]+([a-z0-9_]+)ELb([01]).*/d=\1\/\2 \3 softcap=\4/; s/ptxas info *: //" | paste - - - | sort -u
    grep -h "C7508" devbin/*.log || echo "no C7508"
    ;;
  device)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader || true
    # Each stage under its own time limit, so one hang does not cost the others.
    for m in ${2:-check det time}; do
      timeout "${STAGE_TIMEOUT:-80}" devbin/test_bwd_sm90 "$m" 2>&1 | tee -a "${OUT:-/tmp}/test_bwd.log" || echo "stage $m: rc=$?"
    done
    # Other builds under devbin/*/ (e.g. devbin/old/: the committed code) are timed in the same run.
    for bin in devbin/*/test_bwd_sm90; do
      [[ -x "$bin" ]] || continue
      echo "== $bin time"
      timeout "${STAGE_TIMEOUT:-80}" "$bin" time 2>&1 | grep -vE "^device|CHECKS" || echo "$bin: rc=$?"
    done
    if command -v compute-sanitizer > /dev/null; then
      # SANITIZE: "tool:hdim" pairs on the small causal GQA case (hdim 256 passes dQ in 4 rounds).
      for ts in ${SANITIZE:-memcheck:128 racecheck:128 memcheck:256}; do
        echo "== compute-sanitizer --tool ${ts%%:*} small ${ts##*:}"
        timeout 90 compute-sanitizer --tool "${ts%%:*}" devbin/test_bwd_sm90 small "${ts##*:}" 2>&1 | tail -4
      done
    else
      echo "compute-sanitizer not found"
    fi
    ;;
  *) echo "usage: $0 build [HDIM] | sass | device [MODE]"; exit 2 ;;
esac
