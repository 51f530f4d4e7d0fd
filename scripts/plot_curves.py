#!/usr/bin/env python
"""Plot training and evaluation curves of one or more runs into one PNG, for comparison.

    python scripts/plot_curves.py outputs/run_a outputs/run_b --out curves.png

Four panels against the optimizer step: training loss, evaluation loss, perplexity and accuracy,
with one line per run in each. The points come from trainer_state.json's log_history, so the
training loss has a point every --logging_steps and the evaluation panels one per evaluation
(use --eval_strategy steps --eval_steps N for more than the final one).
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

# (panel title, log_history key); LMTrainer logs eval_perplexity with every evaluation
PANELS = (
    ("training loss", "loss"),
    ("evaluation loss", "eval_loss"),
    ("evaluation perplexity", "eval_perplexity"),
    ("evaluation accuracy", "eval_accuracy"),
)


def curve_series(output_dir: str) -> dict:
    """{panel title: (steps, values)} from OUTPUT_DIR/trainer_state.json; empty panels are left out."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    series = {}
    for title, key in PANELS:
        points = [(entry["step"], entry[key]) for entry in history if entry.get(key) is not None]
        if points:
            series[title] = ([step for step, _ in points], [value for _, value in points])
    return series


def plot_curves(output_dirs: list[str], out: str) -> dict:
    """Write the PNG; returns {run label: curve_series(run)}, the data that was plotted."""
    runs = {output_dir.rstrip("/") or output_dir: curve_series(output_dir) for output_dir in output_dirs}
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for axis, (title, _) in zip(axes.flat, PANELS):
        for label, series in runs.items():
            if title in series:
                steps, values = series[title]
                # Markers too, so that a panel with a single evaluation still shows its point.
                axis.plot(steps, values, marker="o", markersize=3, label=label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize="small")
    for axis in axes[-1]:
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return runs


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description="Plot loss, perplexity and accuracy curves of runs into a PNG.")
    cli.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR")
    cli.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    args = cli.parse_args(argv)
    try:
        plot_curves(args.output_dirs, args.out)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: cannot read trainer_state.json: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
