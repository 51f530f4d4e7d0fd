#!/usr/bin/env python
"""Run run_clm.py, run_mlm.py or run_plm.py on a Ray cluster, by Ray Train, surviving a lost worker.

    python scripts/ray_train.py clm --num_workers 2 --max_failures 3 [run_clm.py's flags] --output_dir out

On the cluster RAY_ADDRESS names, else on a local Ray; needs pip install "ray[train]". What it
does and why: utils/raytrain/driver.py; how to use it: docs/ray.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402,F401  (before torch: see utils/__init__.py)
from utils.cli import run_cli  # noqa: E402
from utils.raytrain.driver import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
