"""``python -m utils.report.summary OUTPUT_DIR``: print the launcher's result row of a finished run.

The row and what each cell means are defined in ``utils.report.results``; it is read from the run's
own run_info.json and all_results.json.
"""

import argparse
import sys
from collections.abc import Sequence

from utils.errors import UsageError
from utils.report.results import summary_row


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m utils.report.summary", description="Print the result row of a finished run.")
    cli.add_argument("output_dir")
    args = cli.parse_args(argv)
    try:
        print(summary_row(args.output_dir))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
