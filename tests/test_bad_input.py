"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing on disk changed.

A catalogue of what the three scripts and the launchers refuse. Each case is a fresh process,
as a user runs it, in a folder of its own; the folder (inputs included) and the shared text
files must be exactly as before. Without pytest-xdist the cases run two at a time from one
fixture; under ``pytest -n 2`` xdist spreads them instead.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, TINY, TOKENIZERS

GPT2_SCRATCH = TINY["clm"]
# The launchers read these; a case sets the ones it needs.
LAUNCHER_ENV = ("LM_DEVICE", "DEVICE", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "ACCELERATE_USE_CPU", "AMP_FLAGS",
                "MODEL", "DATASET", "OUTPUT_DIR", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@dataclass
class Where:
    """A case's own folder, its --output_dir inside it, and the shared text files."""
    tmp: Path
    text: dict

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path


@dataclass
class Bad:
    args: list
    fragments: tuple  # must all appear in the error line
    task: str = "clm"  # clm, mlm, plm; or a launcher script name under scripts/
    env: dict = field(default_factory=dict)
    new_files: tuple = ()  # paths relative to the case's folder that may appear (a launcher's log)


CASES = {}


def case(func):
    CASES[func.__name__] = func
    return func


def train(where, *args, train_file=None):
    return [*args, "--do_train", "--train_file", train_file or where.text["train"], "--output_dir", where.out]


# ---------------------------------------------------------------------------- data


@case
def no_dataset_and_no_train_file(w):
    return Bad([*GPT2_SCRATCH, "--do_train", "--output_dir", w.out], ("--dataset_name", "--train_file"))


@case
def missing_train_file(w):
    return Bad(train(w, *GPT2_SCRATCH, train_file=w.tmp / "nope.txt"), ("--train_file", "nope.txt", "no such file"))


@case
def missing_validation_file(w):
    return Bad([*train(w, *TINY["mlm"]), "--validation_file", w.tmp / "valid.txt"],
               ("--validation_file", "valid.txt", "no such file"), task="mlm")


@case
def unsupported_extension(w):
    return Bad(train(w, *GPT2_SCRATCH, train_file=w.file("corpus.parquet", "x")),
               ("corpus.parquet", ".txt (or .raw/.tokens), .csv, .json or .jsonl"))


@case
def train_and_validation_of_different_types(w):
    return Bad([*train(w, *GPT2_SCRATCH), "--validation_file", w.text["valid_csv"]],
               ("--train_file", "--validation_file", "same type"))


@case
def text_column_that_does_not_exist(w):
    return Bad(train(w, *GPT2_SCRATCH, "--text_column_name", "body", train_file=w.text["train_csv"]),
               ("--text_column_name body", "title, text"))


@case
def empty_training_file(w):
    return Bad(train(w, *GPT2_SCRATCH, train_file=w.file("empty.txt", "")), ("--train_file", "empty"))


@case
def empty_validation_file(w):
    return Bad([*train(w, *TINY["plm"]), "--validation_file", w.file("valid.txt", "")],
               ("--validation_file", "empty"), task="plm")


@case
def training_file_too_short_for_one_block(w):
    return Bad(train(w, *GPT2_SCRATCH, train_file=w.file("short.txt", "Just a few words.\n\n")),
               ("no samples", "64 tokens"))


@case
def malformed_jsonl(w):
    jsonl = w.file("train.jsonl", '{"text": "fine"}\n{"text": broken\n')
    return Bad(train(w, *GPT2_SCRATCH, train_file=jsonl), ("--train_file", "train.jsonl", "cannot be read as json"))


@case
def text_file_that_is_not_utf8(w):
    latin1 = w.file("latin1.txt", ("Caf\xe9 cr\xe8me br\xfbl\xe9e. " * 100 + "\n").encode("latin-1"))
    return Bad(train(w, *GPT2_SCRATCH, train_file=latin1), ("--train_file", "latin1.txt", "cannot be read"))


@case
def validation_split_beyond_100_percent(w):
    return Bad([*train(w, *GPT2_SCRATCH, "--validation_split_percentage", "150"), "--do_eval"],
               ("--validation_split_percentage 150",))


@case
def streaming_without_max_steps(w):
    return Bad(train(w, *GPT2_SCRATCH, "--streaming"), ("--streaming", "--max_steps"))


# ---------------------------------------------------------------------------- model and tokenizer


@case
def odd_max_seq_length_for_plm(w):
    return Bad(train(w, *TINY["plm"], "--max_seq_length", "63"), ("--max_seq_length 63", "even"), task="plm")


@case
def tokenizer_without_mask_token_for_mlm(w):
    return Bad(train(w, "--model_type", "bert", "--tokenizer_name", TOKENIZERS / "gpt2"),
               ("no mask token", "--tokenizer_name"), task="mlm")


@case
def tokenizer_folder_that_does_not_exist(w):
    return Bad(train(w, "--model_type", "gpt2", "--tokenizer_name", w.tmp / "no-tokenizer"),
               ("--tokenizer_name", "no-tokenizer", "no such folder"))


@case
def zero_block_size(w):
    return Bad(train(w, *GPT2_SCRATCH, "--block_size", "0"), ("--block_size 0", "positive"))


@case
def config_overrides_with_a_pretrained_model(w):
    return Bad(train(w, "--model_name_or_path", "gpt2", "--config_overrides", "n_layer=2"),
               ("--config_overrides", "--model_name_or_path"))


@case
def bad_config_overrides_syntax(w):
    return Bad(train(w, "--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--config_overrides",
                     "n_layer2"), ("--config_overrides", "key=value"))


@case
def model_path_that_does_not_exist(w):
    return Bad(train(w, "--model_name_or_path", w.tmp / "no-such-model"), ("--model_name_or_path", "no-such-model"))


@case
def hub_model_name_offline(w):
    return Bad(train(w, "--model_name_or_path", "gpt2"), ("--model_name_or_path gpt2", "HF_HUB_OFFLINE"))


@case
def unknown_model_type(w):
    return Bad(train(w, "--model_type", "gpt7", "--tokenizer_name", TOKENIZERS / "gpt2"), ("--model_type gpt7", "gpt2"))


# ---------------------------------------------------------------------------- flags


@case
def unknown_flag(w):
    return Bad(train(w, *GPT2_SCRATCH, "--block_sise", "64"), ("--block_sise",))


@case
def malformed_json_file_of_flags(w):
    return Bad([w.file("flags.json", '{"do_train": tru')], ("flags.json", "not a JSON file of flags"))


@case
def mlm_probability_out_of_range(w):
    return Bad(train(w, *TINY["mlm"], "--mlm_probability", "1.5"), ("--mlm_probability 1.5",), task="mlm")


@case
def plm_probability_out_of_range(w):
    return Bad(train(w, *TINY["plm"], "--plm_probability", "0"), ("--plm_probability",), task="plm")


@case
def fp16_and_bf16_together(w):
    return Bad(train(w, *GPT2_SCRATCH, "--fp16", "--bf16"), ("--fp16", "--bf16"))


@case
def unknown_opt_level(w):
    return Bad(train(w, *GPT2_SCRATCH, "--fp16", "--fp16_opt_level", "O4"), ("--fp16_opt_level", "O4"))


@case
def invalid_loss_scale(w):
    return Bad(train(w, *GPT2_SCRATCH, "--fp16", "--loss_scale", "-1"), ("--loss_scale",))


@case
def combine_grad_without_half_precision(w):
    return Bad(train(w, *GPT2_SCRATCH, "--use_combine_grad"), ("--use_combine_grad", "--fp16 or --bf16"))


@case
def unknown_nonfinite_loss_policy(w):
    return Bad(train(w, *GPT2_SCRATCH, "--on_nonfinite_loss", "ignore"), ("--on_nonfinite_loss", "ignore"))


# ---------------------------------------------------------------------------- output folder and checkpoints


@case
def non_empty_output_dir_without_overwrite(w):
    w.out.mkdir()
    (w.out / "model.safetensors").write_bytes(b"previous results")
    return Bad(train(w, *GPT2_SCRATCH), ("--output_dir", "--overwrite_output_dir"))


@case
def output_dir_that_is_a_file(w):
    w.file("out", "not a folder")
    return Bad(train(w, *GPT2_SCRATCH), ("--output_dir", "is a file"))


@case
def output_dir_that_cannot_be_created(w):
    w.file("results", "a file where a folder should be")
    return Bad([*GPT2_SCRATCH, "--do_eval", "--validation_file", w.text["valid"], "--output_dir",
                w.tmp / "results" / "run1"], ("--output_dir", "cannot be created", "is a file"))


@case
def resume_from_a_checkpoint_that_does_not_exist(w):
    return Bad(train(w, *GPT2_SCRATCH, "--resume_from_checkpoint", w.tmp / "checkpoint-9"),
               ("--resume_from_checkpoint", "checkpoint-9", "no such folder"))


@case
def resume_from_a_damaged_checkpoint(w):
    checkpoint = w.tmp / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"cut off")
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps({"global_step": 4,
                                                                      "files": {"model.safetensors": 1000}}))
    return Bad(train(w, *GPT2_SCRATCH, "--resume_from_checkpoint", checkpoint),
               ("--resume_from_checkpoint", "damaged", "model.safetensors"))


# ---------------------------------------------------------------------------- launchers


@case
def launcher_with_an_unknown_task(w):
    return Bad(["translation"], ("TASK must be clm, mlm or plm",), task="launch.sh")


@case
def launcher_with_a_bad_node_count(w):
    return Bad([], ("NNODES=two",), task="train_clm_1p.sh", env={"NNODES": "two"})


@case
def launcher_with_more_processes_than_devices(w):
    # No GPU here: CUDA cannot start; on a GPU machine: more processes than GPUs. Both name CUDA.
    return Bad([], ("CUDA",), task="train_clm_8p.sh", env={"DEVICE": "cuda", "NPROC_PER_NODE": "64"})


@case
def launcher_passes_on_the_scripts_error_and_status(w):
    # torchrun's report stays in the log; the launcher's own line gives the script's reason and status.
    return Bad(["--block_sise", "64", "--output_dir", w.out], ("run_clm.py failed (exit 2)", "--block_sise"),
               task="train_clm_1p.sh", env={"DEVICE": "cpu"}, new_files=("out", "out/train.log"))


# ---------------------------------------------------------------------------- running the cases


def snapshot(*folders) -> dict:
    return {path: (path.stat().st_size, path.stat().st_mtime_ns)
            for folder in folders for path in sorted(Path(folder).rglob("*"))}


def run_case(name, where) -> tuple:
    bad = CASES[name](where)
    if bad.task.endswith(".sh"):
        command = ["bash", str(ROOT / "scripts" / bad.task)]
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    else:
        command, env = [sys.executable, str(ROOT / f"run_{bad.task}.py")], dict(os.environ)
    before = snapshot(where.tmp, where.text["train"].parent)
    process = subprocess.run([*command, *map(str, bad.args)], cwd=ROOT, capture_output=True, text=True,
                             env={**env, **bad.env}, timeout=600)
    return bad, process, before, snapshot(where.tmp, where.text["train"].parent)


class Outcomes:
    """Runs the cases, two at a time unless xdist already runs tests in parallel."""

    def __init__(self, tmp_path_factory, text_files):
        self.where = {name: Where(tmp_path_factory.mktemp(name), text_files) for name in CASES}
        in_xdist = "PYTEST_XDIST_WORKER" in os.environ
        self.pool = None if in_xdist else ThreadPoolExecutor(2)
        self.futures = {name: self.pool.submit(run_case, name, self.where[name]) for name in CASES} if self.pool else {}

    def __getitem__(self, name):
        return self.futures[name].result() if name in self.futures else run_case(name, self.where[name])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, text_files, offline_hub):
    results = Outcomes(tmp_path_factory, text_files)
    yield results
    if results.pool:
        results.pool.shutdown(cancel_futures=True)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, outcomes):
    bad, process, before, after = outcomes[name]
    err = process.stderr
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err + process.stdout
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err[-3000:]
    for fragment in bad.fragments:
        assert fragment in error_lines[0], error_lines[0]
    for new in bad.new_files:
        after.pop(outcomes.where[name].tmp / new, None)
    assert after == before, "files were created, changed or removed"
