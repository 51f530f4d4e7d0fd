"""A plain ``python run_clm.py`` on a machine with several GPUs or NPUs becomes one DDP process per device.

Otherwise the Trainer would run one process and split each batch over the devices with
``nn.DataParallel``: slower than DDP, and with ``--use_combine_grad``'s flat buffers not
synchronised at all. ``LM_AUTO_DDP=0`` keeps the single process.
"""

from __future__ import annotations

import logging
import os
import sys

from utils.cli import Command
from utils.dist import is_distributed
from utils.launch.device import device_count, env_flag

logger = logging.getLogger(__name__)

AUTO_DDP_ENV = "LM_AUTO_DDP"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def devices_to_fill(device: str) -> int:
    """How many processes a plain start on ``device`` becomes: the visible devices, or 1.

    1 when already distributed, on the CPU, with one device, or with ``LM_AUTO_DDP=0``.
    """
    if device == "cpu" or is_distributed() or not env_flag(AUTO_DDP_ENV, default=True):
        return 1
    return max(device_count(device), 1)


def all_devices_command(device: str, command: Command) -> list[str] | None:
    """The torchrun command that runs ``command`` on every visible device, or None (see ``devices_to_fill``)."""
    visible = devices_to_fill(device)
    if visible < 2:
        return None
    return [sys.executable, "-m", "utils.launch.torchrun", "--standalone", f"--nproc_per_node={visible}",
            os.path.abspath(command.script), *command.args]


def run_on_all_devices(device: str, command: Command) -> None:
    """Replace this process by one process per visible device (DDP) when that is what it needs."""
    torchrun = all_devices_command(device, command)
    if torchrun is None:
        if device != "cpu" and not is_distributed() and device_count(device) > 1:
            logger.warning("%d %s devices visible and %s=0: the Trainer splits batches over them with "
                           "DataParallel; torchrun (scripts/train_*_8p.sh) runs one process per device",
                           device_count(device), device.upper(), AUTO_DDP_ENV)
        return
    logger.warning("%d %s devices visible: running one process per device under torchrun (DDP), the global batch "
                   "is %d x --per_device_train_batch_size. %s=0 keeps one process.",
                   device_count(device), device.upper(), device_count(device), AUTO_DDP_ENV)
    # utils.launch.torchrun is found from any working directory.
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(torchrun[0], torchrun, {**os.environ, "PYTHONPATH": path})
