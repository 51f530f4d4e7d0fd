"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing on disk changed."""

import pytest

from conftest import TINY, TOKENIZERS, run_script

GPT2_SCRATCH = TINY["clm"]


def snapshot(folder) -> dict:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


def expect_one_line_error(task, args, *fragments, output_dir=None):
    before = snapshot(output_dir) if output_dir else None
    process = run_script(task, *args, check=False)
    err = process.stderr
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    if output_dir is not None:
        assert snapshot(output_dir) == before


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_no_dataset_and_no_train_file(out):
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--output_dir", out], 
                          "--dataset_name", "--train_file")


def test_missing_file(out, tmp_path):
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", tmp_path / "nope.txt",
                                  "--output_dir", out], "--train_file", "nope.txt", "no such file")


def test_unsupported_extension(out, tmp_path):
    (tmp_path / "corpus.parquet").write_text("x")
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", tmp_path / "corpus.parquet",
                                  "--output_dir", out], "corpus.parquet", ".txt (or .raw/.tokens), .csv, .json or .jsonl")


def test_train_and_validation_of_different_types(out, text_files):
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", text_files["train"],
                                  "--validation_file", text_files["valid_csv"], "--output_dir", out], 
                          "--train_file", "--validation_file", "same type")


def test_text_column_that_does_not_exist(out, text_files):
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", text_files["train_csv"],
                                  "--text_column_name", "body", "--output_dir", out], 
                          "--text_column_name body", "title, text")


def test_odd_max_seq_length_for_plm(out, text_files):
    args = [*TINY["plm"], "--max_seq_length", "63", "--do_train", "--train_file", text_files["train"],
            "--output_dir", out]
    expect_one_line_error("plm", args, "--max_seq_length 63", "even")


def test_tokenizer_without_mask_token_for_mlm(out, text_files):
    args = ["--model_type", "bert", "--tokenizer_name", TOKENIZERS / "gpt2", "--do_train",
            "--train_file", text_files["train"], "--output_dir", out]
    expect_one_line_error("mlm", args, "no mask token", "--tokenizer_name")


def test_config_overrides_with_a_pretrained_model(out, text_files):
    args = ["--model_name_or_path", "gpt2", "--config_overrides", "n_layer=2", "--do_train",
            "--train_file", text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--config_overrides", "--model_name_or_path")


def test_model_path_that_does_not_exist(out, text_files, tmp_path):
    args = ["--model_name_or_path", tmp_path / "no-such-model", "--do_train", "--train_file",
            text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--model_name_or_path", "no-such-model")


def test_hub_model_name_offline(out, text_files):
    args = ["--model_name_or_path", "gpt2", "--do_train", "--train_file", text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--model_name_or_path gpt2", "HF_HUB_OFFLINE")


def test_empty_training_file(out, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", empty, "--output_dir", out],
                          "--train_file", "empty")


def test_training_file_too_short_for_one_block(out, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.\n\n")
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", short, "--output_dir", out],
                          "no samples", "64 tokens")


def test_non_empty_output_dir_without_overwrite(out, text_files):
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous results")
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--train_file", text_files["train"],
                                  "--output_dir", out], "--output_dir", "--overwrite_output_dir",
                          output_dir=out)
    assert (out / "model.safetensors").read_bytes() == b"previous results"


def test_unknown_flag(out):
    expect_one_line_error("clm", [*GPT2_SCRATCH, "--do_train", "--block_sise", "64", "--output_dir", out],
                          "--block_sise")


def test_unknown_model_type(out, text_files):
    args = ["--model_type", "gpt7", "--tokenizer_name", TOKENIZERS / "gpt2", "--do_train", "--train_file",
            text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--model_type gpt7", "gpt2")


def test_bad_config_overrides_syntax(out, text_files):
    args = ["--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--config_overrides", "n_layer2",
            "--do_train", "--train_file", text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--config_overrides", "key=value")


def test_streaming_without_max_steps(out, text_files):
    args = [*GPT2_SCRATCH, "--streaming", "--do_train", "--train_file", text_files["train"], "--output_dir", out]
    expect_one_line_error("clm", args, "--streaming", "--max_steps")
