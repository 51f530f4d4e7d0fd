"""A plain ``python run_clm.py`` on a machine with several GPUs or NPUs becomes one DDP process per device.

Otherwise the Trainer would run one process and split each batch over the devices with
``nn.DataParallel``: slower than DDP, and with ``--use_combine_grad``'s flat buffers not
synchronised at all. ``LM_AUTO_DDP=0`` keeps the single process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from .device import device_count, env_flag, is_distributed

logger = logging.getLogger(__name__)

AUTO_DDP_ENV = "LM_AUTO_DDP"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_devices_command(device: str, argv: Sequence[str] | None = None) -> list[str] | None:
    """The torchrun command that runs this script on every visible device, or None.

    None when already distributed, on the CPU, with one device, or with ``LM_AUTO_DDP=0``.
    """
    if device == "cpu" or is_distributed():
        return None
    if not env_flag(AUTO_DDP_ENV, default=True):
        return None
    visible = device_count(device)
    if visible < 2:
        return None
    argv = sys.argv[1:] if argv is None else list(argv)
    script = os.path.abspath(sys.argv[0])
    return [sys.executable, "-m", "utils.torchrun", "--standalone", f"--nproc_per_node={visible}", script, *argv]


def run_on_all_devices(device: str) -> None:
    """Replace this process by one process per visible device (DDP) when that is what it needs."""
    command = all_devices_command(device)
    if command is None:
        if device != "cpu" and not is_distributed() and device_count(device) > 1:
            logger.warning("%d %s devices visible and %s=0: the Trainer splits batches over them with "
                           "DataParallel; torchrun (scripts/train_*_8p.sh) runs one process per device",
                           device_count(device), device.upper(), AUTO_DDP_ENV)
        return
    logger.warning("%d %s devices visible: running one process per device under torchrun (DDP), the global batch "
                   "is %d x --per_device_train_batch_size. %s=0 keeps one process.",
                   device_count(device), device.upper(), device_count(device), AUTO_DDP_ENV)
    # utils.torchrun is found from any working directory.
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, "PYTHONPATH": path})
