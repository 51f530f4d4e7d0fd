"""``--pad_vocab_to_multiple_of``: the same training with padded vocabulary matrices, saved at the true size.

The padded model trains to the same losses, accuracy and weights as the unpadded one (the padded
entries' scores are -inf), with the model's own loss and with the chunked loss; what it saves is
loaded by stock transformers code at the original vocabulary size and equals the unpadded run's
model; a checkpoint resumes into the padded model.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_cases import FAMILIES, family_trainer, logged
from conftest import QUICK, TINY, read_json, run_script
from utils.model.vocab_padding import VocabPadding, pad_vocabulary


def padded(model, multiple: int = 48) -> torch.nn.Module:
    pad_vocabulary(model, multiple)  # the tiny vocabulary of 128 becomes 144
    return model


def true_weights(model) -> dict:
    padding = VocabPadding.of(model)
    state = model.state_dict()
    return padding.cut(state) if padding else state


@pytest.mark.parametrize("task,chunk", [("clm", 0), ("clm", 5), ("mlm", 0), ("plm", 0)])
def test_a_padded_vocabulary_trains_to_the_same_losses_and_weights(task, chunk, tmp_path):
    make_model = FAMILIES[task][0]
    runs = {}
    for pad in (False, True):
        model = padded(make_model()) if pad else make_model()
        trainer = family_trainer(task, tmp_path / str(pad), model=model, loss_chunk_size=chunk)
        trainer.train()
        runs[pad] = logged(trainer, "loss"), trainer.evaluate(), true_weights(trainer.model)
    assert VocabPadding.of(trainer.model).padded == 144 and trainer.model.config.vocab_size == 144
    (losses, evaluation, weights), (padded_losses, padded_evaluation, padded_weights) = runs[False], runs[True]
    assert padded_losses == pytest.approx(losses, rel=1e-5)
    assert padded_evaluation["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert padded_evaluation["eval_accuracy"] == evaluation["eval_accuracy"]
    assert padded_weights.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(padded_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_of_a_padded_model_resumes_into_it(tmp_path):
    whole = family_trainer("clm", tmp_path / "whole", model=padded(FAMILIES["clm"][0]()), save_strategy="steps",
                           save_steps=2)
    whole.train()
    resumed = family_trainer("clm", tmp_path / "resumed", model=padded(FAMILIES["clm"][0](seed=5)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert len(logged(whole, "loss")) == 3  # the resumed history holds the checkpoint's steps and the last
    assert logged(resumed, "loss") == pytest.approx(logged(whole, "loss"), rel=1e-5)
    for name, value in true_weights(whole.model).items():
        torch.testing.assert_close(true_weights(resumed.model)[name], value, msg=name)


def test_run_clm_saves_a_padded_model_that_stock_code_loads_at_the_true_vocabulary(text_files, tmp_path):
    results = {}
    for flags in ([], ["--pad_vocab_to_multiple_of", "64"]):
        out = tmp_path / str(len(flags))
        run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--validation_file",
                   text_files["valid"], "--do_train", "--do_eval", "--save_steps", "2", "--output_dir", out, *flags)
        results[bool(flags)] = read_json(out / "train_results.json")["train_loss"], read_json(
            out / "eval_results.json")["eval_loss"], out
    (train_loss, eval_loss, out), (padded_train_loss, padded_eval_loss, padded_out) = results[False], results[True]
    assert padded_train_loss == pytest.approx(train_loss, rel=1e-5)
    assert padded_eval_loss == pytest.approx(eval_loss, rel=1e-5)
    reference = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for folder in (padded_out, padded_out / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(folder)  # stock code, nothing of this suite
        assert model.config.vocab_size == 50257 and model.get_input_embeddings().weight.shape == (50257, 64)
        if folder == padded_out:
            for name, value in reference.items():
                torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_negative_multiple_is_one_error_line(text_files, tmp_path):
    process = run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--do_train",
                         "--output_dir", tmp_path / "out", "--pad_vocab_to_multiple_of", "-64", check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        "error: --pad_vocab_to_multiple_of -64: give a positive number of rows (e.g. 64), or 0 for no padding"]
