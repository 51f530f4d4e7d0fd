"""Each benchmark script runs on a tiny size and prints a Markdown table with its columns."""

import subprocess
import sys

import pytest

from conftest import ROOT

CASES = {
    "bench_data.py": (["--repeats", "1,2", "--lines", "150", "--block_size", "128"],
                      ["pipeline", "text", "run", "wall s", "tokens/s", "peak RSS MB", "cache MB"], 8),
    "bench_packing.py": (["--size", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "1", "--lines", "200"],
                         ["case", "padding share", "real tokens/s (median)"], 5),
    "bench_integrity.py": (["--size", "tiny", "--repeats", "1", "--rounds", "1"],
                           ["what", "MB", "check s", "overhead"], 5),
    "bench_eval.py": (["--scales", "1,2", "--lines", "30", "--block_size", "64", "--batch_size", "2"],
                      ["approach", "eval set", "samples", "peak RSS MB", "growth vs 1x MB", "accuracy"], 4),
    "bench_train.py": (["--size", "tiny", "--steps", "2", "--warmup", "1", "--cases", "clm,mlm"],
                       ["case", "script", "samples/s", "tokens/s"], 2),
    "bench_amp_step.py": (["--device", "cpu", "--sizes", "tiny", "--steps", "2"],
                          ["device", "size", "level", "combine_grad", "median ms/step", "aten ops/step"], 4),
    "bench_vs_stock.py train": (["--steps", "2", "--warmup", "1", "--rounds", "1", "--eval_blocks", "4",
                                 "--objective", "mlm"],
                                ["case", "train tokens/s", "vs stock", "eval tokens/s", "eval loss", "peak RSS MB"], 4),
    "bench_vs_stock.py objectives": (["--steps", "2", "--warmup", "1", "--rounds", "1", "--eval_blocks", "4"],
                                     ["script", "stock samples/s", "ours samples/s", "vs stock", "RSS vs stock",
                                      "loss vs stock", "stock MFU", "ours MFU"], 3),
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


def test_bench_gpu_dry_run_prints_tokens_per_second_loss_ratios_and_peak_memory():
    """The prepared GPU measurement, on the CPU at a tiny size: its tables, and one JSON line for stock and ours."""
    import json

    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry_run"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["dry_run"] and result["tf32_matmul"] is False
    correctness = result["correctness"]
    assert len(correctness) == 8 and correctness["O0 (fp32, TF32 off)"]["loss_ratio_to_o0"] == 1.0
    for label, row in correctness.items():
        assert len(row["loss"]) == len(row["grad_norm"]) == result["steps"], label
        # Tiny model, 4 steps: every precision stays within 1% of fp32 (measured: 2e-5 at most).
        assert abs(row["loss_ratio_to_o0"] - 1) < 1e-2 and abs(row["grad_norm_ratio_to_o0"] - 1) < 1e-2, label
    pipelines = {(row["pipeline"].split()[0], row["batch"]) for row in result["speed"]}
    assert pipelines == {(side, batch) for side in ("stock", "ours") for batch in (2, 4)}
    assert {"ours bf16 O2 + combine_grad + --pad_vocab_to_multiple_of 64",
            "ours bf16 O2 + combine_grad + --loss_chunk_size 1024"} <= {row["pipeline"] for row in result["speed"]}
    assert result["liger"]["importable"] is False and "--use_liger_kernel" in result["liger"]["ours"]  # none here
    for row in result["speed"]:
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["mfu"] is None, row  # CPU: no peak
    tables = [line for line in process.stdout.splitlines() if line.startswith("| ")]
    assert len(tables) == 2 + 8 + 2 + 10
