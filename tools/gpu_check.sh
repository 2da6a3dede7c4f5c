#!/bin/sh
# The GPU check (issue 16 §5), on the GPU machine: `make gpu-check`, or `sh tools/gpu_check.sh` in the bundle
# `make gpu-check-bundle` made.  Installs the bundled wheels (what that machine lacks: orjson) into
# .gpu-check/site with `pip install --no-index --target` — no network — then runs tools/gpu_check.py with
# python3 (PYTHON=... to choose another).  One line per check; exit 1 if one fails; without a GPU, one line
# saying so and exit 0.
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
site="$here/.gpu-check/site"
if ls "$here"/wheels/*.whl >/dev/null 2>&1; then
  mkdir -p "$site"
  if ! "$py" -m pip install --quiet --no-index --no-deps --upgrade --target "$site" "$here"/wheels/*.whl \
      >"$here/.gpu-check/pip.log" 2>&1; then
    # no pip for this python: a wheel is a zip of what goes into site-packages
    "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$site" "$here"/wheels/*.whl || { echo "FAIL gpu-check: cannot install $here/wheels (see .gpu-check/pip.log)"; exit 1; }
  fi
fi
PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" "$here/tools/gpu_check.py" "$@"
