"""What a run records about itself when it starts: one setup block in the log and run_info.json.

``ReportCallback`` (registered for every run by ``LMTrainer``), at the start of training, on the
main process, logs the device, precision (backend, O-level, combine_grad, loss scale), world size
and effective batch size, and writes the same facts to ``OUTPUT_DIR/run_info.json``, which every
report (``utils.results``: the launcher's row, the results table, the model card) reads, so that
none of them derives the setup from flags again or unpickles ``training_args.bin``.
"""

from __future__ import annotations

import logging
import os
import sys

from transformers import TrainerCallback

from .device import describe_device
from .results import RUN_INFO, read_json, write_json
from .speed import effective_batch_size
from .secrets import mask_command, secret_values

logger = logging.getLogger(__name__)




def amp_type(args) -> str:
    """The AMP_Type column: the O-level of an fp16 run ("bf16 O2" for bf16), else "fp32"."""
    if args.fp16:
        return args.fp16_opt_level
    return f"bf16 {args.fp16_opt_level}" if args.bf16 else "fp32"


def precision_setup(args) -> dict:
    """The precision the run uses, read after parsing filled in the defaults (--fp16 alone is O1)."""
    half = args.fp16 or args.bf16
    return {
        "amp_type": amp_type(args),
        "precision": "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        # The mixed-precision setup resolves --amp_backend auto to the backend it chose.
        "precision_backend": ("apex" if args.amp_backend == "apex" else "native") if half else "none",
        "opt_level": args.fp16_opt_level if half else None,
        "combine_grad": args.use_combine_grad,
        "loss_scale": args.loss_scale if args.fp16 else None,
    }


def model_label(model_args) -> str:
    """The model column: the checkpoint's name (its last path part), else the model type trained from scratch."""
    checkpoint = (model_args.model_name_or_path or "").rstrip("/")
    return os.path.basename(checkpoint) or checkpoint or model_args.model_type or "unknown"


def dataset_label(data_args) -> str:
    """The hub dataset (with its configuration) or the local files the run read."""
    if data_args.dataset_name:
        config = data_args.dataset_config_name
        return f"{data_args.dataset_name} ({config})" if config else data_args.dataset_name
    files = [data_args.train_file, data_args.validation_file]
    return ", ".join(f for f in files if f) or "unknown"


def describe_run(training_args, model_args, data_args, flags: list[str]) -> None:
    """Note on ``training_args`` what run_info.json says about the model, data and command."""
    training_args.run_model = model_label(model_args)
    training_args.run_dataset = dataset_label(data_args)
    # Hub tokens masked by the values the parser found, however they were spelled (utils/secrets.py).
    secrets = secret_values(model_args, training_args)
    training_args.run_command = [os.path.basename(sys.argv[0]), *mask_command(flags, secrets)]


def run_info(args) -> dict:
    """Everything the start-of-run block, the model card and the results table say about the setup."""
    script, *flags = args.run_command or ["run_*.py"]
    return {
        "model": args.run_model,
        "dataset": args.run_dataset,
        "script": script,
        "devices": f"{args.world_size}p",
        "world_size": args.world_size,
        "device": describe_device(args.device.type),
        **precision_setup(args),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": effective_batch_size(args),
        "flags": flags,
    }


def log_run_setup(info: dict) -> None:
    logger.info(
        "Run setup:\n"
        "  device: %s\n"
        "  world size: %d\n"
        "  precision: %s, backend %s, opt level %s, combine_grad %s, loss scale %s\n"
        "  effective batch size %d = %d per device x %d accumulation steps x %d processes",
        info["device"], info["world_size"],
        info["precision"], info["precision_backend"], info["opt_level"] or "n/a", info["combine_grad"],
        info["loss_scale"] if info["loss_scale"] is not None else "n/a",
        info["effective_batch_size"], info["per_device_train_batch_size"], info["gradient_accumulation_steps"],
        info["world_size"],
    )


def write_run_info(args, overwrite: bool = True, info: dict | None = None) -> None:
    """OUTPUT_DIR/run_info.json (main process only); ``overwrite=False`` keeps one already there."""
    path = os.path.join(args.output_dir, RUN_INFO)
    if overwrite or read_json(path) is None:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(path, info or run_info(args))


class ReportCallback(TrainerCallback):
    """Logs the setup and writes run_info.json when training starts."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            info = run_info(args)
            log_run_setup(info)
            write_run_info(args, info=info)
