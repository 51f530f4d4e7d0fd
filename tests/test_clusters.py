"""Runs as clusters start them: 2-process runs that end with 0 every time."""

import subprocess
import sys

from conftest import ROOT, TINY, clean_env, free_port


def test_two_process_runs_end_with_status_0_every_time(text_files, tmp_path):
    """Ten 2-process runs of 2 steps, DDP and FSDP in turn: each process leaves its process group and exits 0.

    A process that ended while gloo's threads were still releasing its last collective used to
    abort at exit (SIGABRT, "terminate called without an active exception") about one run in ten.
    """
    flags = [*TINY["clm"], "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "2",
             "--max_train_samples", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
             "--train_file", str(text_files["train"]), "--cache_dir", str(tmp_path / "cache")]
    for attempt in range(10):
        sharding = ["--fsdp"] if attempt % 2 else []
        command = [sys.executable, "-m", "utils.launch.torchrun", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(ROOT / "run_clm.py"), *flags, *sharding,
                   "--output_dir", str(tmp_path / f"run{attempt}")]
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=clean_env())
        assert process.returncode == 0, f"run {attempt + 1} of 10 {sharding}:\n{process.stderr}"
        assert "terminate called" not in process.stderr
