"""What the benchmark scripts share: the Markdown table they end with (the results table's printer)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.report.results import markdown_table  # noqa: E402


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    print(markdown_table(columns, rows))


def show_progress(row: list[str]) -> None:
    """One finished row on stderr while the rest still run (the table comes at the end, on stdout)."""
    print(" | ".join(row), file=sys.stderr, flush=True)
