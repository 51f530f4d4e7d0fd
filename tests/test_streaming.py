"""--streaming end to end for the permutation LM, and the default bound on a streamed evaluation."""

import pytest

from conftest import QUICK, TINY, read_json, run_script


@pytest.mark.parametrize("layout", [[], ["--line_by_line", "--per_device_train_batch_size", "3"]])
def test_plm_streaming(layout, text_files, tmp_path):
    # Grouped blocks are even (64); streamed lines have odd lengths too, and batches are padded to even.
    run_script("plm", *TINY["plm"], *QUICK, *layout, "--streaming", "--train_file", text_files["train"],
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
