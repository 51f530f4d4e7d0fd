"""The one-line result row the launchers print at the end of a run.

Format (the reference table's), defined here and nowhere else:

    | gpt2 | 8p | Acc: 0.4213 | FPS: 123.4 | AMP_Type: O2 | Epochs: 3 |

    model     --model_name_or_path (its last path part) or --model_type, else config.json
    devices   processes in the run, e.g. "8p"
    Acc       eval_accuracy from all_results.json ("n/a" without evaluation)
    FPS       samples per second over all devices after the warm-up steps: "fps"
              (train_samples_per_second, which counts start-up too, when there is none)
    AMP_Type  --fp16_opt_level with --fp16, "fp16" without a level, "bf16", or "fp32"
    Epochs    the epochs trained (all_results.json "epoch"), else --num_train_epochs

Every row starts with "| ", so the last one in a log is ``grep '^| ' train.log | tail -1``.

``python -m utils.summary OUTPUT_DIR --devices 8p -- FLAGS...`` prints the row for a finished
run; FLAGS are the ones the run was started with (the launcher passes its whole list).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from utils.errors import UsageError

_TRUE = ("true", "1", "yes", "y", "t")


def format_row(model: str, devices: str, accuracy: float | None, fps: float | None, amp: str, epochs: float | None) -> str:
    """The result row; missing numbers print as "n/a"."""
    cells = [
        model,
        devices,
        f"Acc: {format_number(accuracy, '.4f')}",
        f"FPS: {format_number(fps, '.1f')}",
        f"AMP_Type: {amp}",
        f"Epochs: {format_epochs(epochs)}",
    ]
    return "| " + " | ".join(cells) + " |"


def parse_row(line: str) -> dict:
    """Inverse of format_row: {"model", "devices", "acc", "fps", "amp", "epochs"} (numbers or None)."""
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) != 6:
        raise ValueError(f"not a summary row: {line!r}")
    model, devices, acc, fps, amp, epochs = cells
    return {
        "model": model,
        "devices": devices,
        "acc": _parse_number(acc, "Acc"),
        "fps": _parse_number(fps, "FPS"),
        "amp": _value(amp, "AMP_Type"),
        "epochs": _parse_number(epochs, "Epochs"),
    }


def format_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_epochs(value: float | None) -> str:
    if value is None:
        return "n/a"
    # A run stopped by --max_steps reports a fraction of an epoch; whole runs read "3".
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _value(cell: str, label: str) -> str:
    prefix = f"{label}: "
    if not cell.startswith(prefix):
        raise ValueError(f"expected '{prefix}...' in summary cell {cell!r}")
    return cell[len(prefix):]


def _parse_number(cell: str, label: str) -> float | None:
    text = _value(cell, label)
    return None if text == "n/a" else float(text)


# --------------------------------------------------------------------------- reading a run


def flag_value(flags: Sequence[str], name: str) -> str | None:
    """The last value given for --name: "true" for a bare boolean flag, None when absent."""
    value = None
    for i, arg in enumerate(flags):
        if arg == f"--{name}":
            following = flags[i + 1] if i + 1 < len(flags) else "--"
            value = "true" if following.startswith("--") else following
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def amp_type(flags: Sequence[str]) -> str:
    """The AMP column from the run's flags."""
    fp16 = (flag_value(flags, "fp16") or "").lower() in _TRUE
    bf16 = (flag_value(flags, "bf16") or "").lower() in _TRUE
    return amp_label(fp16, bf16, flag_value(flags, "fp16_opt_level"))


def amp_label(fp16: bool, bf16: bool, opt_level: str | None) -> str:
    """The AMP column's name for a precision setting (see the module docstring)."""
    if fp16:
        return opt_level or "fp16"
    return "bf16" if bf16 else "fp32"


def fps_of(results: dict) -> float | None:
    """The FPS column from all_results.json: after warm-up, else the Trainer's whole-run figure."""
    return results.get("fps", results.get("train_samples_per_second"))


def model_label(flags: Sequence[str], output_dir: str) -> str:
    """The model column: the checkpoint's name, the model type trained from scratch, or config.json's."""
    checkpoint = flag_value(flags, "model_name_or_path")
    if checkpoint:
        return os.path.basename(checkpoint.rstrip("/")) or checkpoint
    model_type = flag_value(flags, "model_type")
    if model_type:
        return model_type
    config = read_json(os.path.join(output_dir, "config.json")) or {}
    name = config.get("_name_or_path") or config.get("model_type") or "unknown"
    return os.path.basename(name.rstrip("/")) or name


def summary_row(output_dir: str, devices: str, flags: Sequence[str]) -> str:
    """The row for the finished run in ``output_dir`` (reads its all_results.json)."""
    results_path = os.path.join(output_dir, "all_results.json")
    results = read_json(results_path)
    if results is None:
        raise UsageError(f"{results_path} not found: the run did not finish, or ran without --do_train/--do_eval")
    epochs = results.get("epoch")
    if epochs is None and flag_value(flags, "num_train_epochs"):
        epochs = float(flag_value(flags, "num_train_epochs"))
    return format_row(
        model=model_label(flags, output_dir),
        devices=devices,
        accuracy=results.get("eval_accuracy"),
        fps=fps_of(results),
        amp=amp_type(flags),
        epochs=epochs,
    )


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m utils.summary",
        description="Print the result row of a finished run.",
        usage="%(prog)s OUTPUT_DIR [--devices Np] [-- RUN_FLAGS...]",
    )
    cli.add_argument("output_dir")
    cli.add_argument("--devices", default="1p", help='the "devices" column, e.g. 8p')
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: argparse cannot mix a positional with a trailing "-- flags..." list.
    split = argv.index("--") if "--" in argv else len(argv)
    args = cli.parse_args(argv[:split])
    run_flags = argv[split + 1 :]
    try:
        print(summary_row(args.output_dir, args.devices, run_flags))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
