"""What a run records about itself when it starts: one setup block in the log and run_info.json.

``run_info`` is built from what the run uses: the precision the Trainer's mixed-precision hooks
run (``utils.train.precision.MixedPrecision.report``: after the backend was chosen), the devices
and processes the Trainer was given, and what the flags were parsed into (model, data, command,
batch sizes). ``ReportCallback`` logs it and writes ``OUTPUT_DIR/run_info.json`` on the main
process when training starts; every report (``utils/report/results.py``: the launcher's row, the
results table, the model card) reads that file, so that none of them derives the setup again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from transformers import TrainerCallback

from utils.files import read_json, write_json
from utils.launch.device import describe_device, tf32_matmul
from utils.report.speed import effective_batch_size
from utils.runs.folder import describe_output_dir
from utils.runs.record import RUN_INFO

logger = logging.getLogger(__name__)


def run_info(args, precision: dict, optimizer: dict | None = None) -> dict:
    """Everything the start-of-run block, the model card and the results table say about the setup.

    ``precision``: what ``AmpConfig.report`` gives for the config the run uses (or the fp32 report);
    ``optimizer``: which optimizer implementation steps the weights, once it is built.
    """
    script, *flags = args.run_command or ["run_*.py"]
    return {
        "model": args.run_model,
        "dataset": args.run_dataset,
        "script": script,
        "devices": f"{args.world_size}p",
        "world_size": args.world_size,
        "device": describe_device(args.device.type),
        **precision,
        **(optimizer or {}),
        "tf32_matmul": tf32_matmul(args.device.type),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": effective_batch_size(args),
        "flags": flags,
    }


def log_run_setup(info: dict, output_dir: str, start: str) -> None:
    """The run setup, once, before the first progress bar: ``output_dir`` as ``describe_output_dir`` names it,
    ``start`` as ``RunFolder.describe_start`` does."""
    optimizer = info.get("optimizer") or {}
    logger.info(
        "Run setup:\n"
        "  model: %s\n"
        "  data: %s\n"
        "  output folder: %s\n"
        "  start: %s\n"
        "  device: %s\n"
        "  world size: %d\n"
        "  precision: %s, backend %s, opt level %s, combine_grad %s, loss scale %s\n"
        "  effective batch size %d = %d per device x %d accumulation steps x %d processes\n"
        "  optimizer: %s, %s kernel\n"
        "  TF32 matmul: %s",
        info["model"], info["dataset"], output_dir, start, info["device"], info["world_size"],
        info["precision"], info["precision_backend"], info["opt_level"] or "n/a", info["combine_grad"],
        info["loss_scale"] if info["loss_scale"] is not None else "none",
        info["effective_batch_size"], info["per_device_train_batch_size"], info["gradient_accumulation_steps"],
        info["world_size"], optimizer.get("name", "n/a"), optimizer.get("implementation", "n/a"),
        "on (--tf32)" if info["tf32_matmul"] else "off (fp32 matmuls in full fp32; --tf32 turns it on on CUDA)",
    )


def write_run_info(output_dir: str, info: dict, overwrite: bool = True) -> None:
    """OUTPUT_DIR/run_info.json (main process only); ``overwrite=False`` keeps one already there."""
    path = os.path.join(output_dir, RUN_INFO)
    if overwrite or read_json(path) is None:
        os.makedirs(output_dir, exist_ok=True)
        write_json(path, info)


class ReportCallback(TrainerCallback):
    """Logs the setup and writes run_info.json when training starts; ``describe()`` gives ``run_info``,
    ``start()`` how the run starts in its folder. It is to come before the progress bar's callback, so
    that the setup is not printed in the middle of the bar."""

    def __init__(self, describe: Callable[[], dict], start: Callable[[], str]):
        self.describe = describe
        self.start = start
        self.logged = False

    def log_setup_once(self, args) -> dict:
        """Log the run setup unless this process did already (training, then evaluating); returns ``run_info``."""
        info = self.describe()
        if not self.logged:
            log_run_setup(info, describe_output_dir(args), self.start())
            self.logged = True
        return info

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_run_info(args.output_dir, self.log_setup_once(args))
