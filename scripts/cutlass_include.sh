#!/usr/bin/env bash
# Prints the CuTe/CUTLASS include directory for the dev scripts (dev_fwd.sh, dev_bwd.sh):
# $CUTLASS_INC if set, else the nvidia-cutlass wheel's (cutlass_library) in python3's
# environment, else in .venv.
set -uo pipefail
if [ -n "${CUTLASS_INC:-}" ]; then echo "$CUTLASS_INC"; exit 0; fi
python3 -c "import importlib.util,os;s=importlib.util.find_spec('cutlass_library');print(os.path.join(s.submodule_search_locations[0],'source','include'))" 2>/dev/null && exit 0
inc=$(ls -d .venv/lib/python3.*/site-packages/cutlass_library/source/include 2>/dev/null | head -1)
if [ -n "$inc" ]; then echo "$inc"; exit 0; fi
echo "no nvidia-cutlass include directory found: set CUTLASS_INC (e.g. the py312 build venv's" \
  "site-packages/cutlass_library/source/include)" >&2
exit 1
