"""Each benchmark script runs on a tiny size and prints a Markdown table with its columns."""

import subprocess
import sys

import pytest

from conftest import ROOT

CASES = {
    "bench_data.py": (["--repeats", "1,2", "--lines", "150", "--block_size", "128"],
                      ["pipeline", "text", "run", "wall s", "tokens/s", "peak RSS MB", "cache MB"], 8),
    "bench_integrity.py": (["--size", "tiny", "--repeats", "1", "--rounds", "1"],
                           ["what", "MB", "check s", "overhead"], 2),
    "bench_eval.py": (["--scales", "1,2", "--lines", "30", "--block_size", "64", "--batch_size", "2"],
                      ["approach", "eval set", "samples", "peak RSS MB", "growth vs 1x MB", "accuracy"], 4),
    "bench_train.py": (["--size", "tiny", "--steps", "2", "--warmup", "1", "--cases", "clm,mlm"],
                       ["case", "script", "samples/s", "tokens/s"], 2),
    "bench_amp_step.py": (["--device", "cpu", "--sizes", "tiny", "--steps", "2"],
                          ["device", "size", "level", "combine_grad", "median ms/step", "aten ops/step"], 4),
    "bench_vs_stock.py train": (["--steps", "2", "--warmup", "1", "--rounds", "1", "--eval_blocks", "4",
                                 "--cases", "stock,ours,ours: --loss_chunk_size 1024"],
                                ["case", "train tokens/s", "vs stock", "eval tokens/s", "eval loss", "peak RSS MB"], 3),
    "bench_vs_stock.py preprocess": (["--repeats", "1", "--lines", "150", "--block_size", "128", "--rounds", "1"],
                                     ["pipeline", "process s", "speed vs stock", "peak RSS MB"], 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_prints_its_table(case):
    args, columns, n_rows = CASES[case]
    script, *row = case.split()
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *row, *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    table = [line for line in process.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert set(columns) <= set(header)
    assert set(table[1].replace("|", "").split()) == {"---"}
    assert len(table) == 2 + n_rows
    assert all(len(row.strip("|").split("|")) == len(header) for row in table[2:])
