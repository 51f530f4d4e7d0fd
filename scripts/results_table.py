#!/usr/bin/env python
"""Print the results of finished runs (one per output directory) as one Markdown table.

    python scripts/results_table.py outputs/clm_8p_seed1 outputs/clm_8p_seed2 [...]

| model | devices | Acc | FPS | AMP_Type | Epochs | eval loss | perplexity | bits/byte | byte ppl | word ppl | tokens/s | run |

model, devices, Acc, FPS, AMP_Type and Epochs mean what they mean in the launchers' summary
row (utils/report/results.py); perplexity is exp(eval_loss); bits/byte, byte ppl and word ppl are
the evaluation loss per byte and per word of the text (causal LMs, docs/evaluation.md); tokens/s is
tokens per second over all devices after the warm-up steps (the Trainer's whole-run figure when there
is none). Numbers
come from all_results.json, the setup from run_info.json (written when training starts).
A directory without all_results.json is reported on stderr and makes the exit status 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402,F401  (before torch: see utils/__init__.py)
from utils.errors import UsageError  # noqa: E402
from utils.report.results import TABLE_COLUMNS, markdown_table, results_cells  # noqa: E402


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description="Print finished runs' results as a Markdown table.")
    cli.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR")
    args = cli.parse_args(argv)
    rows, status = [], 0
    for output_dir in args.output_dirs:
        try:
            cells = results_cells(output_dir)
        except UsageError as exc:  # all_results.json or run_info.json is not valid JSON
            cells, reason = None, str(exc)
        else:
            reason = f"no all_results.json in {output_dir}: the run did not finish"
        if cells is None:
            print(f"error: {reason}", file=sys.stderr)
            status = 2
        else:
            rows.append(cells)
    if rows:
        print(markdown_table(TABLE_COLUMNS, [[row[column] for column in TABLE_COLUMNS] for row in rows]))
    return status


if __name__ == "__main__":
    sys.exit(main())
