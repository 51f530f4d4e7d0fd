#!/usr/bin/env bash
# Install the suite's requirements into the current Python (use a virtual environment if you like).
# torch comes first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build where
# a CPU build is wanted. For a CUDA machine, install the torch build you need before running this.
# WITH_RAY=1 adds the optional Ray Train extra (scripts/ray_train.py, docs/ray.md), pinned to the tested release.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
"$PYTHON" -m pip install --quiet -r requirements.txt
if [[ ${WITH_RAY:-0} == 1 ]]; then
    "$PYTHON" -m pip install --quiet "ray[train]==${RAY_VERSION:-2.60.0}"
fi
