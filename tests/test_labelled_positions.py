"""The head and the loss at the labelled positions only: the numbers of the full head, with less work.

Each masked LM (BERT, RoBERTa, DistilBERT, ALBERT) and XLNet's permutation LM is compared with
its own full head, forward and gradients; the Trainer's losses and accuracy with
``--head_at_every_position``; and run_mlm.py end to end the same way.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from amp_cases import family_trainer, logged, plm_samples, stack, xlnet
from conftest import QUICK, TINY, read_json, run_script
from utils.model.labelled_positions import LabelledPositions, MaskedHead, PermutationTargets

VOCAB = 300
MASKED_LMS = {
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64),
    "albert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                   embedding_size=16),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0, attention_dropout=0.0,
                  classifier_dropout_prob=0.0)


def masked_lm(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **NO_DROPOUT, **MASKED_LMS[model_type])
    return AutoModelForMaskedLM.from_config(config)


def masked_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (4, 24), generator=generator)
    labelled = torch.rand(input_ids.shape, generator=generator) < 0.15
    labelled[:, 3] = True
    return {"input_ids": input_ids, "labels": torch.where(labelled, input_ids, -100)}


def loss_grads_logits(model, batch: dict, positions: LabelledPositions | None):
    model.zero_grad()
    if positions is None:
        outputs = model(**batch)
        labelled = batch["labels"]
    else:
        with positions.labelled_only(batch) as inputs:
            outputs = model(**inputs)
        labelled = inputs["labels"]
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.loss.detach(), grads, outputs.logits.detach(), labelled


def assert_same_as_the_full_head(model, batch: dict, positions: LabelledPositions) -> torch.Tensor:
    """Loss, gradients and argmax ids at the labelled positions equal the full head's; the compact logits."""
    loss, grads, full_logits, _ = loss_grads_logits(model, batch, None)
    only_loss, only_grads, logits, labelled = loss_grads_logits(model, batch, positions)
    assert only_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert only_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    labels = batch["labels"]
    scored = labels != -100
    predictions = positions.spread(logits, labelled, labels)
    assert torch.equal(predictions[scored], full_logits.argmax(-1)[scored])
    assert (predictions[~scored] == -100).all()
    return logits


@pytest.mark.parametrize("model_type", sorted(MASKED_LMS))
def test_a_masked_lms_head_at_the_masked_positions_gives_the_full_heads_loss_and_gradients(model_type):
    model, batch = masked_lm(model_type), masked_batch()
    positions = LabelledPositions.of(model)
    assert isinstance(positions, MaskedHead)
    logits = assert_same_as_the_full_head(model, batch, positions)
    assert logits.shape == (int((batch["labels"] != -100).sum()), VOCAB)  # the head ran at those rows only
    assert model(input_ids=batch["input_ids"]).logits.shape == (4, 24, VOCAB)  # outside: every position


def test_xlnet_at_its_targets_only_gives_the_full_loss_and_gradients():
    model, batch = xlnet(), stack(plm_samples(6, seed=3))
    positions = LabelledPositions.of(model)
    assert isinstance(positions, PermutationTargets)
    logits = assert_same_as_the_full_head(model, batch, positions)
    most = int((batch["labels"] != -100).sum(1).max())
    assert logits.shape[:2] == (6, most) and most < batch["labels"].shape[1]


def test_models_whose_head_runs_where_the_loss_looks_are_left_alone():
    from amp_cases import gpt2

    assert LabelledPositions.of(gpt2()) is None


@pytest.mark.parametrize("task", ["mlm", "plm"])
def test_training_and_evaluation_give_the_losses_and_accuracy_of_the_head_at_every_position(task, tmp_path):
    runs = {}
    for every in (True, False):
        trainer = family_trainer(task, tmp_path / str(every), gradient_accumulation_steps=2,
                                 per_device_train_batch_size=4, head_at_every_position=every)
        assert (trainer.labelled_positions is None) == every
        rows = []  # rows of scores the output layer computes, per call
        trainer.model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: rows.append(output.shape[:-1].numel()))
        trainer.train()
        runs[every] = logged(trainer, "loss"), trainer.evaluate(), sum(rows)
    (losses, evaluation, every_rows), (only_losses, only_evaluation, only_rows) = runs[True], runs[False]
    assert only_losses == pytest.approx(losses, rel=1e-5)
    assert only_evaluation["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert only_evaluation["eval_accuracy"] == evaluation["eval_accuracy"]
    assert only_rows < every_rows / 2  # far fewer scores computed


def test_run_mlm_gives_the_same_results_with_the_head_at_every_position(text_files, tmp_path):
    results = {}
    for flags in ([], ["--head_at_every_position"]):
        out = tmp_path / str(len(flags))
        process = run_script("mlm", *TINY["mlm"], *QUICK, "--train_file", text_files["train"], "--validation_file",
                             text_files["valid"], "--do_train", "--do_eval", "--output_dir", out, *flags)
        said = "Loss: the model's head" if flags else "Loss: the head at the labelled positions only"
        assert said in process.stdout + process.stderr  # the log says which head ran
        results[len(flags)] = read_json(out / "train_results.json")["train_loss"], read_json(out / "eval_results.json")
    (train_loss, evaluation), (every_train_loss, every_evaluation) = results[0], results[1]
    assert train_loss == pytest.approx(every_train_loss, rel=1e-5)
    assert evaluation["eval_loss"] == pytest.approx(every_evaluation["eval_loss"], rel=1e-5)
    # Counted over the masked positions (NaN would mean none): the same share with either head.
    assert evaluation["eval_accuracy"] == pytest.approx(every_evaluation["eval_accuracy"], abs=1e-9)
