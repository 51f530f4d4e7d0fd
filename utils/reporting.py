"""What a run tells its users: a setup block at the start, tokens/s while training, a model card.

* ``ReportCallback`` (registered for every run by ``LMTrainer``): at the start of training, on
  the main process, logs one block with the device, precision (backend, O-level, combine_grad,
  loss scale), world size and effective batch size, and writes the same facts to
  ``OUTPUT_DIR/run_info.json`` so that the report scripts never unpickle ``training_args.bin``.
  ``LMTrainer.log`` asks it for ``tokens_per_second`` (all processes together) over the steps
  since the last training log (progress bar, TensorBoard, ``trainer_state.json``). The time
  between two logs needs no device sync of its own: logging the loss already waits for the device.
* ``write_model_card(trainer)``: ``OUTPUT_DIR/README.md`` from all_results.json and run_info.json;
  called after each results file is saved, so the last card holds train and eval metrics.
* ``results_cells(output_dir)``: one finished run's numbers for ``scripts/results_table.py``.

Column names and number formats are those of the launcher's summary row (``utils.summary``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from transformers import TrainerCallback

from .device import describe_device
from .secrets import mask_command
from .summary import amp_label, flag_value, format_epochs, format_number, fps_of, model_label, read_json

logger = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
MODEL_CARD = "README.md"
RESULTS = "all_results.json"


# --------------------------------------------------------------------------- the run's setup


def run_flags(argv: list[str] | None = None) -> list[str]:
    """This process's flags (a single .json argument file becomes flags too), hub tokens masked.

    They are written into run_info.json and the model card, which are meant to be shared; the
    tokens are masked by the values the parser found (utils/secrets.py), however they were spelled.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        flags = []
        for name, value in (read_json(argv[0]) or {}).items():
            flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
        argv = flags
    return mask_command(argv)


def effective_batch_size(args) -> int:
    """Samples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def precision_setup(args) -> dict:
    """Precision facts, read defensively: the AMP flags are not in every version of the arguments."""
    fp16, bf16 = bool(getattr(args, "fp16", False)), bool(getattr(args, "bf16", False))
    half = fp16 or bf16
    opt_level = getattr(args, "fp16_opt_level", None) if half else None
    return {
        "amp_type": amp_label(fp16, bf16, opt_level),
        "precision": "fp16" if fp16 else "bf16" if bf16 else "fp32",
        # The mixed-precision setup resolves --amp_backend auto to the backend it chose.
        "precision_backend": ("apex" if getattr(args, "amp_backend", None) == "apex" else "native") if half else "none",
        "opt_level": opt_level,
        "combine_grad": bool(getattr(args, "use_combine_grad", False)),
        "loss_scale": getattr(args, "loss_scale", None) if fp16 else None,
    }


def dataset_label(flags: list[str]) -> str:
    """The hub dataset (with its configuration) or the local files the run read."""
    name = flag_value(flags, "dataset_name")
    if name:
        config = flag_value(flags, "dataset_config_name")
        return f"{name} ({config})" if config else name
    files = [flag_value(flags, "train_file"), flag_value(flags, "validation_file")]
    return ", ".join(f for f in files if f) or "unknown"


def run_info(args) -> dict:
    """Everything the start-of-run block, the model card and the results table say about the setup."""
    flags = run_flags()
    return {
        "model": model_label(flags, args.output_dir),
        "dataset": dataset_label(flags),
        "script": os.path.basename(sys.argv[0]),
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


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- during training


class ReportCallback(TrainerCallback):
    """Logs the setup and writes run_info.json at the start; keeps the clock for tokens/s."""

    def __init__(self):
        self._mark = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._restart_clock(state)
        if state.is_world_process_zero:
            info = run_info(args)
            log_run_setup(info)
            os.makedirs(args.output_dir, exist_ok=True)
            _write_json(os.path.join(args.output_dir, RUN_INFO), info)

    # Evaluations and checkpoint saves are not training: the next window starts after them.
    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_clock(state)

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock(state)

    def _restart_clock(self, state) -> None:
        self._mark = (time.perf_counter(), state.global_step)

    def speed_since_last_log(self, args, state, tokens_per_sample: float | None) -> dict:
        """tokens/s over the optimizer steps since the last log, evaluation or save."""
        start, start_step = self._mark
        self._restart_clock(state)
        seconds, steps = time.perf_counter() - start, state.global_step - start_step
        if not tokens_per_sample or steps <= 0 or seconds <= 0:
            return {}
        samples_per_second = steps * effective_batch_size(args) / seconds
        return {"tokens_per_second": round(samples_per_second * tokens_per_sample, 1)}


# --------------------------------------------------------------------------- at the end


def write_model_card(trainer) -> None:
    """Write OUTPUT_DIR/README.md from the results saved so far (main process only)."""
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    info_path = os.path.join(output_dir, RUN_INFO)
    info = read_json(info_path)
    if info is None:  # an evaluation-only run: no training started to write it
        info = run_info(trainer.args)
        _write_json(info_path, info)
    results = read_json(os.path.join(output_dir, RESULTS)) or {}
    with open(os.path.join(output_dir, MODEL_CARD), "w", encoding="utf-8") as f:
        f.write(model_card(info, results))
    logger.info("Model card written to %s", os.path.join(output_dir, MODEL_CARD))


# (label, all_results.json key, number format), in the card's order
_CARD_METRICS = (
    ("eval loss", "eval_loss", ".4f"),
    ("perplexity", "perplexity", ".2f"),
    ("eval accuracy", "eval_accuracy", ".4f"),
    ("train loss", "train_loss", ".4f"),
    ("train samples/s (whole run)", "train_samples_per_second", ".2f"),
    ("train tokens/s (whole run)", "train_tokens_per_second", ".0f"),
    ("FPS, samples/s after warm-up", "fps", ".2f"),
    ("tokens/s after warm-up", "fps_tokens_per_second", ".0f"),
    ("MFU", "mfu", ".4f"),
    ("train samples", "train_samples", "d"),
    ("eval samples", "eval_samples", "d"),
)


def model_card(info: dict, results: dict) -> str:
    """The card's Markdown: what was trained on what, the metrics, precision and hardware."""
    metrics = [f"| {label} | {format_number(results[key], spec)} |"
               for label, key, spec in _CARD_METRICS if results.get(key) is not None]
    epochs = format_epochs(results.get("epoch"))
    command = " ".join(["python", info.get("script", "run_*.py"), *info.get("flags", [])])
    lines = [
        f"# {info['model']}",
        "",
        f"A {info['model']} language model trained with `{info.get('script', 'this suite')}`.",
        "",
        "## Data",
        "",
        f"- dataset: {info['dataset']}",
        f"- epochs: {epochs}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(metrics or ["| (none saved) | |"]),
        "",
        "## Precision and hardware",
        "",
        f"- device: {info['device']}",
        f"- processes: {info['world_size']} ({info['devices']})",
        f"- precision: {info['precision']} (AMP_Type {info['amp_type']}), backend {info['precision_backend']}, "
        f"opt level {info['opt_level'] or 'n/a'}, combine_grad {info['combine_grad']}, "
        f"loss scale {info['loss_scale'] if info['loss_scale'] is not None else 'n/a'}",
        f"- batch: {info['effective_batch_size']} samples per optimizer step "
        f"({info['per_device_train_batch_size']} per device x {info['gradient_accumulation_steps']} "
        f"accumulation steps x {info['world_size']} processes)",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading finished runs


TABLE_COLUMNS = ("model", "devices", "Acc", "FPS", "AMP_Type", "Epochs", "perplexity", "tokens/s", "run")


def results_cells(output_dir: str) -> dict | None:
    """One finished run's table cells (TABLE_COLUMNS), or None without all_results.json.

    A run from before run_info.json existed still gets a row; what only run_info.json knows
    reads "n/a".
    """
    results = read_json(os.path.join(output_dir, RESULTS))
    if results is None:
        return None
    info = read_json(os.path.join(output_dir, RUN_INFO)) or {}
    tokens_per_second = results.get("fps_tokens_per_second", results.get("train_tokens_per_second"))
    return {
        "model": info.get("model") or model_label([], output_dir),
        "devices": info.get("devices", "n/a"),
        "Acc": format_number(results.get("eval_accuracy"), ".4f"),
        "FPS": format_number(fps_of(results), ".1f"),
        "AMP_Type": info.get("amp_type", "n/a"),
        "Epochs": format_epochs(results.get("epoch")),
        "perplexity": format_number(results.get("perplexity"), ".2f"),
        "tokens/s": format_number(tokens_per_second, ".0f"),
        "run": output_dir.rstrip("/"),
    }
