"""What a run prints first: one log format for ours, transformers' and datasets' lines, each line once, the
output folder named at the start (the default one too), and the run setup once, before the progress bar."""

import logging
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT, TINY, WIKI_TEST_RAW
from utils.launch.start import setup_logging
from utils.runs import folder

RECORD = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ([\w.]+) - (.*)$")


def test_a_run_prints_one_format_each_line_once_and_its_setup_before_the_bar(tmp_path):
    # A text file of its own, so that datasets prepares it now and logs doing so.
    train = tmp_path / "train.txt"
    shutil.copyfile(WIKI_TEST_RAW, train)
    command = [sys.executable, str(ROOT / "run_clm.py"), *TINY["clm"], "--train_file", str(train), "--do_train",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_train_samples", "8",
               "--report_to", "none"]  # no --output_dir: the default folder, in the current one
    process = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "COLUMNS": "120"}, timeout=600)
    log = process.stdout
    assert process.returncode == 0, log[-3000:]
    lines = log.splitlines()

    # One format: no line in transformers' own ("[INFO|trainer.py:1633] ... >> ...").
    assert [line for line in lines if re.match(r"^\[(DEBUG|INFO|WARNING|ERROR)\|", line)] == []
    records = [(i, match) for i, line in enumerate(lines) if (match := RECORD.match(line))]
    assert {match.group(2).split(".")[0] for _, match in records} >= {"utils", "transformers", "datasets"}

    # Each datasets line once: not a second time, plain, as datasets' own handler printed it.
    datasets_messages = [match.group(3) for _, match in records if match.group(2).startswith("datasets")]
    assert datasets_messages
    assert len(set(datasets_messages)) == len(datasets_messages)
    assert [line for line in lines if line in datasets_messages] == []

    # The output folder first, before any data is read; the default one said to be the default.
    default = tmp_path / "trainer_output"
    named = [i for i, match in records if match.group(3).startswith("Output folder: ")]
    assert len(named) == 1 and named[0] < min(i for i, match in records if match.group(2).startswith("datasets"))
    assert lines[named[0]].endswith(f"Output folder: {default} (--output_dir not given: transformers' default, "
                                    "trainer_output)")
    assert (default / "train_results.json").is_file()

    # The run setup once, whole, before the progress bar starts.
    assert log.count("Run setup:") == 1
    start = next(i for i, line in enumerate(lines) if line.endswith("Run setup:"))
    end = next(i for i in range(start + 1, len(lines)) if not re.match(r"^  [a-zA-Z][\w ]*: ", lines[i]))
    setup = "\n".join(lines[start:end])
    for text in ("model: gpt2", f"data: {train}", f"output folder: {default} (--output_dir not given",
                 "start: fresh start", "device: cpu", "precision: fp32"):
        assert text in setup, text
    assert log.index("Run setup:") < log.index("0%|")


def test_datasets_and_transformers_lines_go_through_the_one_root_handler():
    setup_logging(SimpleNamespace(should_log=True, get_process_log_level=lambda: logging.INFO))
    for library in ("datasets", "transformers"):
        assert (logging.getLogger(library).handlers, logging.getLogger(library).propagate) == ([], True), library


def test_the_output_folder_is_named_whole_and_the_default_said_so(tmp_path):
    given = SimpleNamespace(output_dir=str(tmp_path / "out"), output_dir_given=True)
    default = SimpleNamespace(output_dir="trainer_output", output_dir_given=False)
    assert folder.describe_output_dir(given) == str(tmp_path / "out")
    assert folder.describe_output_dir(default) == (f"{os.path.abspath('trainer_output')} "
                                            "(--output_dir not given: transformers' default, trainer_output)")


def test_the_setup_says_fresh_start_resume_or_start_over(tmp_path):
    run = folder.RunFolder(str(tmp_path), writes=False)
    assert run.describe_start() == "fresh start"
    run.start_over = True
    assert run.describe_start() == "starting over (--overwrite_output_dir)"
    run.checkpoint = str(tmp_path / "checkpoint-4")
    assert run.describe_start() == f"resuming from {tmp_path / 'checkpoint-4'}"
