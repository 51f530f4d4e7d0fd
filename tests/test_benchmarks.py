"""Each benchmark script runs on a tiny size and prints a Markdown table with its columns."""

import subprocess
import sys

import pytest

from conftest import ROOT

CASES = {
    "bench_data.py": (["--repeats", "1,2", "--lines", "150", "--block_size", "128"],
                      ["pipeline", "text", "run", "wall s", "tokens/s", "peak RSS MB", "cache MB"], 8),
    "bench_eval.py": (["--scales", "1,2", "--lines", "30", "--block_size", "64", "--batch_size", "2"],
                      ["approach", "eval set", "samples", "peak RSS MB", "growth vs 1x MB", "accuracy"], 4),
    "bench_train.py": (["--size", "tiny", "--steps", "2", "--warmup", "1", "--cases", "clm,mlm"],
                       ["case", "script", "samples/s", "tokens/s"], 2),
    "bench_amp_step.py": (["--device", "cpu", "--sizes", "tiny", "--steps", "2"],
                          ["device", "size", "level", "combine_grad", "median ms/step", "aten ops/step"], 4),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_prints_its_table(script):
    args, columns, n_rows = CASES[script]
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    table = [line for line in process.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert set(columns) <= set(header)
    assert set(table[1].replace("|", "").split()) == {"---"}
    assert len(table) == 2 + n_rows
    assert all(len(row.strip("|").split("|")) == len(header) for row in table[2:])
