"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing on disk changed.

A catalogue of what the three scripts and the launchers refuse. Each case is a fresh process,
as a user runs it, in a folder of its own; the folder (inputs included) and the shared text
files must be exactly as before. Without pytest-xdist the cases run two at a time from one
fixture; under ``pytest -n 2`` xdist spreads them instead.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import QUICK, ROOT, TINY, TOKENIZERS, run_script
from utils.runs.checkpoints import write_marker

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
    wrapper: tuple = ()  # a test-only script the run goes through (tests/full_disk.py)


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
def text_file_in_cp1252(w):
    # The cause is shown, not only datasets' "An error occurred while generating the dataset".
    cp1252 = w.file("cp1252.txt", ("Caf\xe9 \u2018cr\xe8me\u2019 br\xfbl\xe9e. " * 100 + "\n").encode("cp1252"))
    return Bad(train(w, *GPT2_SCRATCH, train_file=cp1252),
               ("--train_file", "cp1252.txt", "cannot be read as text", "can't decode byte", "UTF-8"))


@case
def binary_training_file(w):
    binary = w.file("weights.txt", bytes(range(256)) * 64)
    return Bad(train(w, *GPT2_SCRATCH, train_file=binary),
               ("--train_file", "weights.txt", "cannot be read as text", "can't decode byte"))


@case
def jsonl_with_null_text_in_some_rows(w):
    lines = w.text["train"].read_text(encoding="utf-8").splitlines()[:200]
    rows = [json.dumps({"text": None if i % 50 == 20 else line}) for i, line in enumerate(lines)]
    return Bad(train(w, *GPT2_SCRATCH, train_file=w.file("nulls.jsonl", "\n".join(rows) + "\n")),
               ("--train_file", "nulls.jsonl", "4 row(s)", "no text", "null", "'text'"))


@case
def validation_split_beyond_100_percent(w):
    return Bad([*train(w, *GPT2_SCRATCH, "--validation_split_percentage", "150"), "--do_eval"],
               ("--validation_split_percentage 150",))


@case
def streaming_without_max_steps(w):
    return Bad(train(w, *GPT2_SCRATCH, "--streaming"), ("--streaming", "--max_steps"))


@case
def one_line_corpus_to_hold_a_validation_split_out_of(w):
    one_line = w.file("one.txt", w.text["train"].read_text(encoding="utf-8").replace("\n", " ") + "\n")
    return Bad([*train(w, *GPT2_SCRATCH, train_file=one_line), "--do_eval"],
               ("--do_eval", "too few rows", "--validation_file"))


@case
def json_file_holding_one_object(w):
    one = w.file("one.json", json.dumps({"text": w.text["train"].read_text(encoding="utf-8")}))
    return Bad([*train(w, *GPT2_SCRATCH, train_file=one), "--do_eval"], ("--do_eval", "--validation_file"))


@case
def numeric_text_column(w):
    numbers = w.file("numbers.csv", "text\n" + "".join(f"{i}\n" for i in range(500)))
    return Bad(train(w, *GPT2_SCRATCH, train_file=numbers), ("text column", "int64", "not text"))


@case
def bad_file_found_mid_stream(w):
    # A dataset folder read as a stream: the second file is broken, found only while training.
    folder = w.tmp / "dataset"
    folder.mkdir()
    lines = w.text["train"].read_text(encoding="utf-8").splitlines()[:40]
    (folder / "train-0.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    (folder / "train-1.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    return Bad([*GPT2_SCRATCH, "--do_train", "--streaming", "--max_steps", "500", "--per_device_train_batch_size",
                "2", "--report_to", "none", "--dataset_name", folder, "--output_dir", w.out],
               ("train-1.jsonl", "cannot be read", "while streaming"),
               new_files=("out", "out/run_info.json", "out/run_state.json"))  # training had begun


@case
def streamed_text_file_not_utf8_at_its_start(w):
    lines = w.text["train"].read_text(encoding="utf-8").splitlines(keepends=True)
    broken = w.file("broken.txt", "".join(lines[:3]).encode() + b"caf\xe9 \xff\xfe\n" + "".join(lines[3:]).encode())
    # Found before the run starts: no run_info.json, no run_state.json.
    return Bad(train(w, *GPT2_SCRATCH, "--streaming", "--max_steps", "4", "--report_to", "none", train_file=broken),
               ("--train_file", "broken.txt", "cannot be read", "at its start"))


@case
def streamed_jsonl_with_a_bad_line_at_its_start(w):
    lines = w.text["train"].read_text(encoding="utf-8").splitlines()[:60]
    rows = [json.dumps({"text": line}) for line in lines]
    broken = w.file("broken.jsonl", "\n".join(rows[:2] + ['{"text": "cut off'] + rows[2:]) + "\n")
    return Bad(train(w, *GPT2_SCRATCH, "--streaming", "--max_steps", "4", "--report_to", "none", train_file=broken),
               ("--train_file", "broken.jsonl", "cannot be read", "at its start"))


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
def hub_name_with_a_slash_offline(w):
    # Today's hub names have an owner: asked of the hub (offline here), not taken for a missing folder.
    return Bad(train(w, "--model_name_or_path", "openai-community/gpt2"),
               ("--model_name_or_path openai-community/gpt2", "from the hub", "HF_HUB_OFFLINE"))


@case
def config_overrides_with_heads_that_do_not_divide_the_width(w):
    return Bad(train(w, "--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--config_overrides",
                     "n_layer=2,n_embd=64,n_head=3", "--block_size", "64"), ("--config_overrides", "n_head=3",
                                                                            "divisible"))


@case
def config_overrides_with_a_dropout_above_1(w):
    overrides = "n_layer=2,d_model=64,n_head=2,d_head=32,d_inner=128,dropout=1.5"
    return Bad(train(w, "--model_type", "xlnet", "--tokenizer_name", TOKENIZERS / "xlnet-base-cased",
                     "--config_overrides", overrides, "--max_seq_length", "64"),
               ("--config_overrides", "dropout=1.5", "dropout probability"), task="plm")


@case
def config_overrides_setting_a_key_to_none(w):
    return Bad(train(w, "--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--config_overrides",
                     "n_layer=2,n_embd=64,n_head=2,n_inner=None", "--block_size", "64"),
               ("--config_overrides", "n_inner", "--config_name"))


@case
def tokenizer_folder_without_its_vocabulary(w):
    folder = w.tmp / "tokenizer"
    folder.mkdir()
    shutil.copy(TOKENIZERS / "roberta-base" / "tokenizer_config.json", folder)
    return Bad(train(w, *TINY["mlm"][:2], "--tokenizer_name", folder, *TINY["mlm"][4:]),
               ("--tokenizer_name", "no vocabulary"), task="mlm")


@case
def truncated_model_safetensors(w):
    folder = w.tmp / "model"
    _tiny_gpt2(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Bad(["--model_name_or_path", folder, "--tokenizer_name", TOKENIZERS / "gpt2", "--do_eval",
                "--validation_file", w.text["valid"], "--output_dir", w.out],
               ("--model_name_or_path", "weights file is damaged"))


@case
def block_size_of_one_token(w):
    # Would train with a loss of 0: a block of one token has no next token to predict.
    return Bad(train(w, *GPT2_SCRATCH, "--block_size", "1", "--max_steps", "2"), ("--block_size 1", "at least 2"))


@case
def max_seq_length_too_short_to_mask_a_token(w):
    return Bad(train(w, *TINY["mlm"], "--max_seq_length", "3", "--per_device_train_batch_size", "2"),
               ("--max_seq_length 3", "mask no token"), task="mlm")


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


@case
def zero_batch_size(w):
    return Bad(train(w, *GPT2_SCRATCH, "--per_device_train_batch_size", "0"), ("--per_device_train_batch_size 0",))


@case
def zero_gradient_accumulation_steps(w):
    return Bad(train(w, *GPT2_SCRATCH, "--gradient_accumulation_steps", "0"), ("--gradient_accumulation_steps 0",))


@case
def negative_seed(w):
    return Bad(train(w, *GPT2_SCRATCH, "--seed", "-1"), ("--seed -1", "from 0"))


@case
def learning_rate_nan(w):
    return Bad(train(w, *GPT2_SCRATCH, "--learning_rate", "nan"), ("--learning_rate nan", "finite"))


@case
def negative_learning_rate(w):
    return Bad(train(w, *GPT2_SCRATCH, "--learning_rate", "-1"), ("--learning_rate -1", "at least 0"))


@case
def max_grad_norm_nan(w):
    # Would train with clipping silently off: a NaN norm compares false with every gradient norm.
    return Bad(train(w, *GPT2_SCRATCH, "--max_grad_norm", "nan"), ("--max_grad_norm nan", "0 to not clip"))


@case
def zero_max_steps(w):
    # Would train one step and record a finished run.
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "0"), ("--max_steps 0", "at least 1", "--num_train_epochs"))


@case
def zero_epochs_with_max_steps_unset(w):
    # Would train 0 steps and save the untrained model as a finished run with a NaN training loss.
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "-1", "--num_train_epochs", "0"),
               ("--num_train_epochs 0", "above 0", "--max_steps"))


@case
def negative_max_steps_and_zero_epochs(w):
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "-5", "--num_train_epochs", "0"),
               ("--max_steps -5", "at least 1", "--num_train_epochs"))


@case
def negative_save_steps(w):
    return Bad(train(w, *GPT2_SCRATCH, "--save_steps", "-2", "--max_steps", "2"), ("--save_steps -2", "at least 1"))


@case
def negative_dataloader_num_workers(w):
    return Bad(train(w, *GPT2_SCRATCH, "--dataloader_num_workers", "-1"), ("--dataloader_num_workers -1", "0"))


@case
def zero_max_train_samples(w):
    return Bad(train(w, *GPT2_SCRATCH, "--max_train_samples", "0"), ("--max_train_samples 0", "at least 1",
                                                                     "leave it out"))


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


@case
def resume_from_a_folder_that_is_not_a_checkpoint(w):
    notes = w.tmp / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a checkpoint")
    return Bad(train(w, *GPT2_SCRATCH, "--resume_from_checkpoint", notes),
               ("--resume_from_checkpoint", "notes", "not a checkpoint"))


@case
def resume_from_a_checkpoint_of_another_model_size(w):
    checkpoint = _trained_run(w) / "checkpoint-2"
    wider = ["--config_overrides", "n_layer=2,n_embd=128,n_head=2,n_positions=128"]
    return Bad(train(w, *GPT2_SCRATCH[:4], *wider, "--block_size", "64", "--max_steps", "4",
                     "--resume_from_checkpoint", checkpoint), ("--resume_from_checkpoint", "another size"))


@case
def resume_finds_a_checkpoint_of_another_model_size(w):
    shutil.copytree(_trained_run(w) / "checkpoint-2", w.out / "checkpoint-2")
    wider = ["--config_overrides", "n_layer=2,n_embd=128,n_head=2,n_positions=128"]
    return Bad(train(w, *GPT2_SCRATCH[:4], *wider, "--block_size", "64", "--max_steps", "4"),
               ("checkpoint-2", "another size", "--overwrite_output_dir"))


@case
def resume_from_a_checkpoint_whose_trainer_state_is_not_json(w):
    checkpoint = w.tmp / "checkpoint-2"
    shutil.copytree(_trained_run(w) / "checkpoint-2", checkpoint)
    (checkpoint / "checkpoint_complete.json").unlink()  # as another program's checkpoint: used as given
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_history": [')
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "4", "--resume_from_checkpoint", checkpoint),
               ("--resume_from_checkpoint", "checkpoint-2", "trainer_state.json", "cannot be read"))


@case
def resume_from_an_unmarked_checkpoint_whose_optimizer_is_cut_short(w):
    checkpoint = w.tmp / "checkpoint-2"
    shutil.copytree(_trained_run(w) / "checkpoint-2", checkpoint)
    (checkpoint / "checkpoint_complete.json").unlink()  # as another program's checkpoint: used as given
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "4", "--resume_from_checkpoint", checkpoint),
               ("--resume_from_checkpoint", "checkpoint-2", "optimizer.pt", "cut short"))


@case
def resume_an_fsdp_checkpoint_without_fsdp(w):
    # The Trainer tells an --fsdp checkpoint by its pytorch_model_fsdp file (FULL_STATE_DICT, the only
    # state dict --fsdp takes here) and refuses it without --fsdp, with a traceback on every process.
    shutil.copytree(_trained_run(w) / "checkpoint-2", w.out / "checkpoint-2")
    shutil.copy(w.out / "checkpoint-2" / "optimizer.pt", w.out / "checkpoint-2" / "pytorch_model_fsdp.bin")
    (w.out / "checkpoint-2" / "checkpoint_complete.json").unlink()
    write_marker(str(w.out / "checkpoint-2"), 2)  # complete, with its new file
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "4"),
               ("checkpoint-2", "--fsdp", "--overwrite_output_dir"))


@case
def resume_from_a_checkpoint_with_fewer_layers(w):
    checkpoint = _trained_run(w) / "checkpoint-2"
    deeper = ["--config_overrides", "n_layer=3,n_embd=64,n_head=2,n_positions=128"]
    return Bad(train(w, *GPT2_SCRATCH[:4], *deeper, "--block_size", "64", "--max_steps", "4",
                     "--resume_from_checkpoint", checkpoint),
               ("--resume_from_checkpoint", "not there", "transformer.h.2.", "number of layers"))


@case
def resume_finds_a_checkpoint_with_more_layers(w):
    shutil.copytree(_trained_run(w) / "checkpoint-2", w.out / "checkpoint-2")
    shallower = ["--config_overrides", "n_layer=1,n_embd=64,n_head=2,n_positions=128"]
    return Bad(train(w, *GPT2_SCRATCH[:4], *shallower, "--block_size", "64", "--max_steps", "4"),
               ("checkpoint-2", "not in this model", "transformer.h.1.", "--overwrite_output_dir"))


@case
def disk_full_while_saving_a_checkpoint(w):
    # tests/full_disk.py makes the disk "full" (ENOSPC) for checkpoint-2; checkpoint-1 is saved first.
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "3", "--save_steps", "1", "--report_to", "none",
                     "--per_device_train_batch_size", "2"),
               ("no space left", "checkpoint-2", "checkpoint-1", "complete and untouched", "resume"),
               env={"FULL_DISK_AT": "checkpoint-2"}, wrapper=(ROOT / "tests" / "full_disk.py",),
               new_files=("out", "out/run_info.json", "out/run_state.json", "out/checkpoint-1/**"))


@case
def disk_full_at_the_first_write_of_the_runs_record(w):
    return Bad(train(w, *GPT2_SCRATCH, "--max_steps", "2", "--report_to", "none"),
               ("no space left", "--output_dir", "run_state.json", "run the same command again"),
               env={"FULL_DISK_AT": "run_state.json"}, wrapper=(ROOT / "tests" / "full_disk.py",))


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
def launcher_with_an_output_dir_that_is_a_file(w):
    w.file("out", "a file where the run's folder should be")
    return Bad(["--output_dir", w.out], ("--output_dir", "is a file"), task="train_clm_1p.sh", env={"DEVICE": "cpu"})


@case
def launcher_with_a_master_port_in_use(w):
    listener = socket.socket()
    listener.bind(("", 0))
    listener.listen()
    _HELD.append(listener)  # kept open while the launcher runs
    port = str(listener.getsockname()[1])
    return Bad(["--output_dir", w.out], (f"MASTER_PORT={port}", "in use"), task="train_clm_1p.sh",
               env={"DEVICE": "cpu", "MASTER_PORT": port})


@case
def launcher_passes_on_the_scripts_error_and_status(w):
    # torchrun's report stays in the log; the launcher's own line gives the script's reason and status.
    return Bad(["--block_sise", "64", "--output_dir", w.out], ("run_clm.py failed (exit 2)", "--block_sise"),
               task="train_clm_1p.sh", env={"DEVICE": "cpu"}, new_files=("out", "out/train.log"))


# ---------------------------------------------------------------------------- what some cases need


_HELD = []  # sockets that hold a port for as long as the cases run
_TRAINED_LOCK = threading.Lock()


def _tiny_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(folder)


def _trained_run(where) -> Path:
    """A real run's output folder with checkpoint-2 (trained once, shared by the cases that need one)."""
    out = where.tmp.parent / "trained-run"
    with _TRAINED_LOCK:
        if not (out / "checkpoint-2").is_dir():
            run_script("clm", *TINY["clm"], *QUICK, "--max_steps", "2", "--save_steps", "2", "--do_train",
                       "--train_file", where.text["train"], "--output_dir", out)
    return out


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
        command, env = [sys.executable, *map(str, bad.wrapper), str(ROOT / f"run_{bad.task}.py")], dict(os.environ)
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


def test_a_read_only_hf_home_is_named_instead_of_the_train_file(tmp_path, text_files, offline_hub):
    home = tmp_path / "hf"
    home.mkdir()
    where = Where(tmp_path, text_files)
    command = [sys.executable, str(ROOT / "run_clm.py"), *map(str, train(where, *GPT2_SCRATCH, "--max_steps", "2"))]
    if os.geteuid() == 0:
        # root writes through file modes: a read-only mount instead, in a mount namespace of the run's own
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("running as root without unshare -m: cannot make HF_HOME read-only")
        command = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && '
                   'exec "$@"', str(home), *command]
    else:
        home.chmod(0o555)
    before = snapshot(tmp_path, text_files["train"].parent)
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HOME": str(home)})
    home.chmod(0o755)
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, process.stderr[-3000:]
    assert str(home / "datasets") in errors[0] and "HF_HOME" in errors[0] and "--cache_dir" in errors[0], errors[0]
    assert "--train_file" not in errors[0]
    assert snapshot(tmp_path, text_files["train"].parent) == before


def test_a_hub_name_with_a_slash_is_read_from_the_hub_cache(tmp_path, text_files, offline_hub):
    # A copy of openai-community/gpt2 in a private hub cache, laid out as huggingface_hub downloads it (a tiny model
    # with the real tokenizer): offline, the hub is asked and answers from its cache.
    repo = tmp_path / "hf" / "hub" / "models--openai-community--gpt2"
    commit = "0" * 40
    _tiny_gpt2(repo / "snapshots" / commit)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "gpt2" / name, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    process = run_script("clm", "--model_name_or_path", "openai-community/gpt2", "--do_eval", "--validation_file",
                         text_files["valid"], "--max_eval_samples", "4", "--per_device_eval_batch_size", "4",
                         "--report_to", "none", "--output_dir", tmp_path / "out", check=False,
                         env={"HF_HOME": str(tmp_path / "hf")})
    assert process.returncode == 0, process.stderr[-3000:]
    assert str(repo / "snapshots" / commit / "config.json") in process.stdout + process.stderr
    assert (tmp_path / "out" / "eval_results.json").is_file()


@pytest.mark.parametrize("name", ["mlm_probability_out_of_range", "plm_probability_out_of_range",
                                  "odd_max_seq_length_for_plm"])
def test_task_flags_are_refused_while_parsing_before_the_run_starts(name, outcomes):
    # Refused by the task's dataclass as it is built: before start_run, which logs the device and,
    # on a machine with several GPUs, would restart the script under torchrun first.
    _, process, _, _ = outcomes[name]
    assert process.returncode == 2
    assert "Device:" not in process.stdout + process.stderr


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
        tmp = outcomes.where[name].tmp
        if new.endswith("/**"):  # a folder that may appear, with all it holds
            after = {path: v for path, v in after.items() if path != tmp / new[:-3] and
                     (tmp / new[:-3]) not in path.parents}
        after.pop(tmp / new, None)
    assert after == before, "files were created, changed or removed"
