"""A finished run's results, as every report shows them: the launcher's row, the table, the model card.

Everything here is read from the run's own files, never from flags: ``run_info.json`` (what
the run actually used, written when it starts: model, devices, precision, ...) and
``all_results.json`` (its metrics). So the launcher's row, ``scripts/results_table.py`` and
the model card cannot disagree.

The launcher's row, in the reference table's format:

    | gpt2 | 8p | Acc: 0.4213 | FPS: 123.4 | AMP_Type: O2 | Epochs: 3 |

    model     the checkpoint's name (its last path part), the model type trained from scratch,
              else config.json's
    devices   processes in the run, e.g. "8p"
    Acc       eval_accuracy ("n/a" without evaluation)
    FPS       samples per second over all devices after the warm-up steps: "fps"
              (train_samples_per_second, which counts start-up too, when there is none)
    AMP_Type  the O-level with --fp16 or --bf16 (O1 when none was given), else "fp32"
    Epochs    the epochs trained

Every row starts with "| ", so the last one in a log is ``grep '^| ' train.log | tail -1``.
"""

from __future__ import annotations

import json
import logging
import os

from utils.errors import UsageError
from utils.files import read_json, write_text
from utils.runs.record import ALL_RESULTS, MODEL_CARD, RUN_INFO

logger = logging.getLogger(__name__)


def format_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_epochs(value: float | None) -> str:
    if value is None:
        return "n/a"
    # A run stopped by --max_steps reports a fraction of an epoch; whole runs read "3".
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (the results table and every benchmark print one)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- one run's numbers


def save_results(output_dir: str, split: str, metrics: dict, combined: bool = True) -> None:
    """``SPLIT_results.json`` and (``combined``) ``all_results.json``, merged, as the Trainer's
    ``save_metrics`` writes them, but each file whole: a kill or a full disk leaves the old file,
    never a cut one."""
    write_text(os.path.join(output_dir, f"{split}_results.json"), _results_json(metrics))
    if combined:
        path = os.path.join(output_dir, ALL_RESULTS)
        write_text(path, _results_json({**(read_json(path) or {}), **metrics}))


def _results_json(metrics: dict) -> str:
    return json.dumps(metrics, indent=4, sort_keys=True)  # the Trainer's format


def config_model_label(output_dir: str) -> str:
    """The model as the saved config.json names it (runs without run_info.json)."""
    config = read_json(os.path.join(output_dir, "config.json")) or {}
    name = config.get("_name_or_path") or config.get("model_type") or "unknown"
    return os.path.basename(name.rstrip("/")) or name


def read_run(output_dir: str) -> tuple[dict, dict] | None:
    """(run_info, results) of a finished run, None without all_results.json.

    A run from before run_info.json existed still reads: what only run_info.json knows is missing.
    """
    results = read_json(os.path.join(output_dir, ALL_RESULTS))
    if results is None:
        return None
    return read_json(os.path.join(output_dir, RUN_INFO)) or {}, results


def fps_of(results: dict) -> float | None:
    """FPS after warm-up, else the Trainer's whole-run figure."""
    return results.get("fps", results.get("train_samples_per_second"))


TABLE_COLUMNS = ["model", "devices", "Acc", "FPS", "AMP_Type", "Epochs", "eval loss", "perplexity", "bits/byte",
                 "byte ppl", "word ppl", "tokens/s", "run"]


def results_cells(output_dir: str) -> dict | None:
    """One finished run's table cells (TABLE_COLUMNS), or None without all_results.json."""
    run = read_run(output_dir)
    if run is None:
        return None
    info, results = run
    return {
        # Not known at the start (run_plm.py given no model builds XLNet): the saved config says.
        "model": info.get("model") if info.get("model") not in (None, "unknown") else config_model_label(output_dir),
        "devices": info.get("devices", "n/a"),
        "Acc": format_number(results.get("eval_accuracy"), ".4f"),
        "FPS": format_number(fps_of(results), ".1f"),
        "AMP_Type": info.get("amp_type", "n/a"),
        "Epochs": format_epochs(results.get("epoch")),
        "eval loss": format_number(results.get("eval_loss"), ".4f"),
        "perplexity": format_number(results.get("perplexity"), ".2f"),
        # Per byte and per word of the text (causal LMs only): comparable across tokenizers (docs/evaluation.md).
        "bits/byte": format_number(results.get("eval_bits_per_byte"), ".4f"),
        "byte ppl": format_number(results.get("eval_byte_perplexity"), ".4f"),
        "word ppl": format_number(results.get("eval_word_perplexity"), ".2f"),
        "tokens/s": format_number(results.get("fps_tokens_per_second"), ".0f"),
        "run": output_dir.rstrip("/"),
    }


ROW_CELLS = ("model", "devices", "Acc", "FPS", "AMP_Type", "Epochs")


def summary_row(output_dir: str) -> str:
    """The launcher's row for the finished run in ``output_dir`` (its first six table cells)."""
    cells = results_cells(output_dir)
    if cells is None:
        raise UsageError(f"{os.path.join(output_dir, ALL_RESULTS)} not found: the run did not finish, "
                         "or ran without --do_train/--do_eval")
    labelled = [cells["model"], cells["devices"]] + [f"{name}: {cells[name]}" for name in ROW_CELLS[2:]]
    return "| " + " | ".join(labelled) + " |"


# --------------------------------------------------------------------------- the model card


# (label, all_results.json key, number format), in the card's order
_CARD_METRICS = (
    ("eval loss", "eval_loss", ".4f"),
    ("perplexity", "perplexity", ".2f"),
    ("bits per byte", "eval_bits_per_byte", ".4f"),
    ("byte perplexity", "eval_byte_perplexity", ".4f"),
    ("word perplexity", "eval_word_perplexity", ".2f"),
    ("eval accuracy", "eval_accuracy", ".4f"),
    ("train loss", "train_loss", ".4f"),
    ("train samples/s (whole run)", "train_samples_per_second", ".2f"),
    ("FPS, samples/s after warm-up", "fps", ".2f"),
    ("tokens/s after warm-up", "fps_tokens_per_second", ".0f"),
    ("MFU", "mfu", ".4f"),
    ("train samples", "train_samples", "d"),
    ("eval samples", "eval_samples", "d"),
)


def write_model_card(output_dir: str) -> None:
    """OUTPUT_DIR/README.md from run_info.json and the results saved so far."""
    info = read_json(os.path.join(output_dir, RUN_INFO)) or {}
    results = read_json(os.path.join(output_dir, ALL_RESULTS)) or {}
    path = os.path.join(output_dir, MODEL_CARD)
    write_text(path, model_card(info, results))
    logger.info("Model card written to %s", path)


def model_card(info: dict, results: dict) -> str:
    """The card's Markdown: what was trained on what, the metrics, precision and hardware."""
    metrics = [f"| {label} | {format_number(results[key], spec)} |"
               for label, key, spec in _CARD_METRICS if results.get(key) is not None]
    command = " ".join(["python", info.get("script", "run_*.py"), *info.get("flags", [])])
    loss_scale = info.get("loss_scale")
    lines = [
        f"# {info['model']}",
        "",
        f"A {info['model']} language model trained with `{info.get('script', 'this suite')}`.",
        "",
        "## Data",
        "",
        f"- dataset: {info['dataset']}",
        f"- epochs: {format_epochs(results.get('epoch'))}",
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
        f"loss scale {loss_scale if loss_scale is not None else 'none'}",
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
