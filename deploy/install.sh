#!/usr/bin/env sh
# The image's install steps (Dockerfile), also run by tests/test_deploy.py in a fresh venv outside the checkout:
# build the project's wheel, then install that wheel (never the source tree) with torch pinned first.
#   deploy/install.sh SOURCE_DIR PYTHON [TORCH_INDEX_URL] [EXTRAS]
# PYTHON: the interpreter of the target environment. TORCH_INDEX_URL: where torch comes from (the CPU or a CUDA
# index; empty: the default index). EXTRAS: e.g. "trackers" (default). CPT_INSTALL_NO_DEPS=1 installs the wheel
# without its dependencies (the test, which has them at hand already).
set -eu
src=$1
python=$2
torch_index=${3:-}
extras=${4:-trackers}
wheels=$(mktemp -d)
"$python" -m pip wheel --no-deps --wheel-dir "$wheels" "$src"
wheel=$(ls "$wheels"/cpt-*.whl)
if [ "${CPT_INSTALL_NO_DEPS:-0}" = 1 ]; then
  "$python" -m pip install --no-deps "$wheel"
else
  if [ -n "$torch_index" ]; then
    "$python" -m pip install --index-url "$torch_index" torch==2.13.0
  else
    "$python" -m pip install torch==2.13.0
  fi
  "$python" -m pip install "${wheel}[${extras}]"
fi
rm -rf "$wheels"
