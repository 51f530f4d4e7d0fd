"""The three scripts run end to end as a user runs them, on real text and real tokenizers."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, TINY, read_json, run_script

EVAL_KEYS = {"eval_loss", "perplexity", "eval_accuracy", "eval_samples"}
TRAIN_KEYS = {"train_samples", "train_samples_per_second", "train_loss", "fps", "fps_tokens_per_second"}
WARMUP = ["--fps_warmup_steps", "1"]  # QUICK runs 4 steps: time the last 3


@pytest.mark.parametrize("task", ["clm", "mlm", "plm"])
def test_train_and_eval_write_the_expected_outputs(task, text_files, tmp_path):
    out = tmp_path / "out"
    run_script(task, *TINY[task], *QUICK, *WARMUP, "--train_file", text_files["train"], "--validation_file",
               text_files["valid"], "--do_train", "--do_eval", "--output_dir", out)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_results.json", "eval_results.json", "all_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    train, evaluation, combined = (read_json(out / f) for f in ("train_results.json", "eval_results.json",
                                                                  "all_results.json"))
    assert TRAIN_KEYS <= train.keys()
    assert EVAL_KEYS <= evaluation.keys()
    assert (TRAIN_KEYS | EVAL_KEYS) <= combined.keys()
    assert 0.0 <= evaluation["eval_accuracy"] <= 1.0
    assert evaluation["perplexity"] == pytest.approx(2.718281828 ** evaluation["eval_loss"], rel=1e-6)
    assert train["fps_tokens_per_second"] == pytest.approx(train["fps"] * 64, rel=1e-3)
    assert read_json(out / "trainer_state.json")["global_step"] == 4


@pytest.mark.parametrize("kind", ["csv", "json", "jsonl"])
def test_csv_and_json_inputs(kind, text_files, tmp_path):
    column = ["--text_column_name", "content"] if kind == "jsonl" else []
    run_script("clm", *TINY["clm"], *QUICK, *column, "--train_file", text_files[f"train_{kind}"],
               "--validation_file", text_files[f"valid_{kind}"], "--do_train", "--do_eval",
               "--output_dir", tmp_path / "out")
    assert read_json(tmp_path / "out" / "eval_results.json")["eval_samples"] > 0


def test_validation_split_is_held_out_from_the_train_file(text_files, tmp_path):
    run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--validation_split_percentage",
               "10", "--do_train", "--do_eval", "--output_dir", tmp_path / "a")
    run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--validation_split_percentage",
               "20", "--do_train", "--do_eval", "--output_dir", tmp_path / "b")
    a, b = (read_json(tmp_path / d / "all_results.json") for d in "ab")
    # Twice the held-out rows give about twice the evaluation blocks, and fewer training blocks.
    assert 1.5 < b["eval_samples"] / a["eval_samples"] < 2.5
    assert b["train_samples"] < a["train_samples"]


@pytest.mark.parametrize("layout", [["--line_by_line"], ["--line_by_line", "--pad_to_max_length"]])
def test_mlm_line_by_line_and_padding(layout, text_files, tmp_path):
    run_script("mlm", *TINY["mlm"], *QUICK, *WARMUP, *layout, "--train_file", text_files["train"], "--validation_file",
               text_files["valid"], "--do_train", "--do_eval", "--output_dir", tmp_path / "out")
    results = read_json(tmp_path / "out" / "all_results.json")
    # One sample per non-blank line, instead of packed 64-token blocks.
    lines = [l for l in text_files["train"].read_text(encoding="utf-8").splitlines() if l.strip()]
    assert results["train_samples"] == len(lines)
    if "--pad_to_max_length" in layout:
        assert results["fps_tokens_per_second"] == pytest.approx(results["fps"] * 64, rel=1e-3)
    else:
        assert results["fps_tokens_per_second"] < results["fps"] * 64


def test_plm_line_by_line_handles_odd_lengths(text_files, tmp_path):
    # Lines tokenize to odd and even lengths; batches are padded to an even length.
    run_script("plm", *TINY["plm"], *QUICK, "--line_by_line", "--per_device_train_batch_size", "3",
               "--train_file", text_files["train"], "--validation_file", text_files["valid"],
               "--do_train", "--do_eval", "--max_eval_samples", "9", "--output_dir", tmp_path / "out")
    assert read_json(tmp_path / "out" / "eval_results.json")["eval_samples"] == 9


@pytest.mark.parametrize("task, layout", [
    ("clm", []),
    ("mlm", []),
    # Grouped blocks are even (64); streamed lines have odd lengths too, and batches are padded to even.
    ("plm", []),
    ("plm", ["--line_by_line", "--per_device_train_batch_size", "3"]),
])
def test_streaming(task, layout, text_files, tmp_path):
    run_script(task, *TINY[task], *QUICK, *layout, "--streaming", "--train_file", text_files["train"],
               "--validation_file", text_files["valid"], "--max_eval_samples", "12", "--do_train", "--do_eval",
               "--output_dir", tmp_path / "out")
    results = read_json(tmp_path / "out" / "all_results.json")
    assert results["eval_loss"] > 0 and 0 <= results["eval_accuracy"] <= 1
    assert read_json(tmp_path / "out" / "trainer_state.json")["global_step"] == 4


def test_streamed_evaluation_is_bounded_without_max_eval_samples(text_files, tmp_path):
    process = run_script("clm", *TINY["clm"], *QUICK, "--streaming", "--validation_file", text_files["valid"],
                         "--do_eval", "--output_dir", tmp_path / "out")
    assert "Streaming: evaluating on the first 1000 samples" in process.stdout + process.stderr
    assert read_json(tmp_path / "out" / "eval_results.json")["eval_loss"] > 0


def test_streaming_without_max_steps_is_refused(text_files, tmp_path):
    process = run_script("mlm", *TINY["mlm"], "--streaming", "--train_file", text_files["train"], "--do_train",
                         "--report_to", "none", "--output_dir", tmp_path / "out", check=False)
    assert process.returncode == 2 and "give the training length with --max_steps" in process.stderr


O2_COMBINE = ["--fp16", "--fp16_opt_level", "O2", "--use_combine_grad", "--max_grad_norm", "0.5", "--block_size", "32",
              "--per_device_train_batch_size", "2", "--max_train_samples", "64"]


@pytest.mark.parametrize("precision", [[], O2_COMBINE, [*O2_COMBINE, "--packing", "document", "--streaming"]],
                         ids=["fp32", "fp16-O2-combine_grad", "fp16-O2-combine_grad-packed-documents-streamed"])
def test_resume_reaches_the_same_state_as_an_uninterrupted_run(precision, text_files, tmp_path):
    flags = [*TINY["clm"], *QUICK, *precision, "--max_steps", "6", "--save_steps", "3", "--train_file",
             text_files["train"], "--do_train", "--logging_steps", "1", "--train_sampling_strategy", "sequential"]
    run_script("clm", *flags, "--output_dir", tmp_path / "full")

    # A run that stopped after its checkpoint at step 3: the same command picks it up.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    process = run_script("clm", *flags, "--output_dir", interrupted)
    assert "Resuming from" in process.stdout + process.stderr

    # And an explicit --resume_from_checkpoint into a new folder.
    run_script("clm", *flags, "--output_dir", tmp_path / "explicit", "--resume_from_checkpoint",
               interrupted / "checkpoint-3")

    expected = load_file(tmp_path / "full" / "model.safetensors")
    full = [{k: v for k, v in e.items() if k != "tokens_per_second"}  # timing, not state
            for e in read_json(tmp_path / "full" / "trainer_state.json")["log_history"] if "loss" in e]
    for folder in ("interrupted", "explicit"):
        resumed = load_file(tmp_path / folder / "model.safetensors")
        assert expected.keys() == resumed.keys()
        for name, tensor in expected.items():
            # Saved in fp32 whatever the training precision, and bit for bit the same.
            assert tensor.dtype == torch.float32 and tensor.equal(resumed[name]), f"{folder}: {name} differs"
        history = [{k: v for k, v in e.items() if k != "tokens_per_second"}
                   for e in read_json(tmp_path / folder / "trainer_state.json")["log_history"] if "loss" in e]
        assert history == full  # losses, and under fp16 the loss scale too
    if precision:
        assert full[-1]["loss_scale"] == 2.0**16


def test_block_size_beyond_the_model_is_clamped(text_files, tmp_path):
    process = run_script("clm", *TINY["clm"], *QUICK, *WARMUP, "--block_size", "4096", "--train_file", text_files["train"],
                         "--do_train", "--output_dir", tmp_path / "out")
    assert "--block_size 4096 is longer than the model allows (128); using 128" in process.stdout + process.stderr
    results = read_json(tmp_path / "out" / "train_results.json")
    assert results["fps_tokens_per_second"] == pytest.approx(results["fps"] * 128, rel=1e-3)
