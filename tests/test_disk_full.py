"""A disk that fills up during a checkpoint: one error line, the earlier checkpoint intact, resumable.

A real full disk, from a small tmpfs mounted as --output_dir (needs the right to mount; the
injected ENOSPC case in tests/test_bad_input.py runs everywhere). torch's writer reports a full
disk as a bare RuntimeError, which only a real disk shows.
"""

import subprocess

import pytest

from conftest import QUICK, TINY, read_json, run_script
from utils.runs.checkpoints import checkpoint_problem


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    # A checkpoint of the tiny model takes about 42 MB (weights and AdamW state): one fits, two do not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_the_run_resumes(small_disk, text_files):
    out = small_disk / "out"
    flags = [*TINY["clm"], *QUICK, "--max_steps", "3", "--save_steps", "1", "--do_train",
             "--train_file", text_files["train"], "--output_dir", out]
    process = run_script("clm", *flags, check=False)

    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr + process.stdout
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and "checkpoint-1" in errors[0], errors
    assert checkpoint_problem(str(out / "checkpoint-1")) is None
    # The unfinished save is gone; the run's record says which run checkpoint-1 belongs to.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "run_info.json", "run_state.json"]

    # Room again: the same command resumes from checkpoint-1 and finishes.
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    resumed = run_script("clm", *flags)
    assert "Resuming from" in resumed.stderr + resumed.stdout
    assert read_json(out / "trainer_state.json")["global_step"] == 3
