"""Shared building blocks for run_clm.py, run_mlm.py and run_plm.py.

Import this package before torch: torch otherwise auto-loads device backends such as
torch_npu at import time, and a torch_npu installed without Ascend's CANN libraries makes
a plain ``import torch`` fail. The device module loads torch_npu deliberately instead.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
