"""What the benchmark scripts share: the Markdown table they end with (the results table's printer)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.results import markdown_table  # noqa: E402


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    print(markdown_table(columns, rows))
