"""``--loss_chunk_size``: the output layer and the loss a chunk of tokens at a time give the model's own loss.

Compared with the full ``[tokens, vocabulary]`` computation: the function against
``cross_entropy(linear(...))``, the Trainer runs of the three families (GPT-2, RoBERTa, XLNet)
with gradient accumulation against the models' own loss, and run_clm.py with GPT-2's real
vocabulary against the same run without the flag.
"""

import pytest
import torch

from amp_cases import family_trainer, logged
from conftest import QUICK, TINY, read_json, run_script
from utils.model.chunked_loss import ChunkedLoss, linear_cross_entropy


def full_reference(hidden, weight, bias, targets):
    scores = torch.nn.functional.linear(hidden, weight, bias).float()
    loss = torch.nn.functional.cross_entropy(scores, targets, ignore_index=-100, reduction="sum")
    return loss, scores.argmax(-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_chunked_loss_and_gradients_equal_the_full_cross_entropy(chunk, with_bias):
    generator = torch.Generator().manual_seed(0)
    tokens, width, vocab = 150, 24, 1000
    hidden = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.3
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::5] = -100

    results = []
    for compute in (full_reference, lambda *a: linear_cross_entropy(*a, chunk)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        loss, _ = compute(*leaves, targets)
        (loss * 0.5).backward()  # a scale on the loss, as the loss scaler and the 1/count put there
        with torch.no_grad():  # evaluation: the loss and the argmax ids, no gradients
            eval_loss, ids = compute(*leaves, targets)
        results.append((loss.detach(), eval_loss, ids, [t.grad for t in leaves if t is not None]))
    (full_loss, _, full_ids, full_grads), (loss, eval_loss, ids, grads) = results
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert eval_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert torch.equal(ids, full_ids)
    for grad, full in zip(grads, full_grads):
        assert full.abs().max() > 0
        torch.testing.assert_close(grad, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["clm", "mlm", "plm"])
def test_training_with_accumulation_and_evaluation_match_the_models_own_loss(task, tmp_path):
    runs = {}
    for chunk in (0, 5):
        trainer = family_trainer(task, tmp_path / str(chunk), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, loss_chunk_size=chunk)
        assert isinstance(trainer.compute_loss_func, ChunkedLoss) == bool(chunk)
        trainer.train()
        runs[chunk] = (logged(trainer, "loss"), trainer.evaluate(), trainer.model.state_dict())
    (losses, evaluation, weights), (chunked_losses, chunked_evaluation, chunked_weights) = runs[0], runs[5]
    assert chunked_losses == pytest.approx(losses, rel=1e-5)
    assert chunked_evaluation["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert chunked_evaluation["eval_accuracy"] == evaluation["eval_accuracy"]
    moved = 0
    for name, value in weights.items():
        torch.testing.assert_close(chunked_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(value, family_trainer(task, tmp_path / "init").model.state_dict()[name])
    assert moved > 0  # training changed the weights the comparison is about


def test_bf16_o2_with_combined_gradients_matches_the_models_own_loss(tmp_path):
    runs = {}
    for chunk in (0, 16):
        trainer = family_trainer("clm", tmp_path / str(chunk), bf16=True, fp16_opt_level="O2",
                                 use_combine_grad=True, gradient_accumulation_steps=2, loss_chunk_size=chunk)
        trainer.train()
        runs[chunk] = (logged(trainer, "loss"), trainer.evaluate()["eval_loss"])
    # bf16 rounds each chunk's products in its own order: measured differences stay below 2e-3.
    assert runs[16][0] == pytest.approx(runs[0][0], rel=5e-3)
    assert runs[16][1] == pytest.approx(runs[0][1], rel=5e-3)


def test_run_clm_with_gpt2s_vocabulary_gives_the_same_losses(text_files, tmp_path):
    results = {}
    for chunk in ("0", "96"):
        out = tmp_path / chunk
        run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--validation_file",
                   text_files["valid"], "--do_train", "--do_eval", "--gradient_accumulation_steps", "2",
                   "--loss_chunk_size", chunk, "--output_dir", out)
        results[chunk] = read_json(out / "train_results.json")["train_loss"], read_json(out / "eval_results.json")
    (train_loss, evaluation), (chunked_train_loss, chunked_evaluation) = results["0"], results["96"]
    assert chunked_train_loss == pytest.approx(train_loss, rel=1e-5)
    assert chunked_evaluation["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert chunked_evaluation["eval_accuracy"] == pytest.approx(evaluation["eval_accuracy"], abs=1e-9)


@pytest.mark.parametrize("flags,message", [
    (["--loss_chunk_size", "-4"], "--loss_chunk_size -4: give a number of tokens"),
    (["--loss_chunk_size", "64", "--label_smoothing_factor", "0.1"],
     "cannot be combined with --label_smoothing_factor"),
])
def test_bad_chunk_settings_are_refused_with_one_line(flags, message, text_files, tmp_path):
    out = tmp_path / "out"
    process = run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--do_train",
                         "--output_dir", out, *flags, check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [process.stderr.strip()]
    assert message in process.stderr and "Traceback" not in process.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_chunked_loss_is_the_default_for_causal_lms_on_the_cpu_where_it_serves(tmp_path):
    def chunk_of(task, **flags):
        trainer = family_trainer(task, tmp_path / task, **flags)
        chunked = isinstance(trainer.compute_loss_func, ChunkedLoss)
        assert chunked == bool(trainer.args.loss_chunk_size)  # the resolved size is what run_info.json records
        return trainer.args.loss_chunk_size

    assert chunk_of("clm") == 1024
    assert chunk_of("clm", loss_chunk_size=0) == 0  # off when asked
    assert chunk_of("clm", label_smoothing_factor=0.1) == 0  # a loss it does not compute: the model's own
    assert chunk_of("mlm") == chunk_of("plm") == 0  # their heads run at the labelled positions instead
