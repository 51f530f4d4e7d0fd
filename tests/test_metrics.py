"""Streaming accuracy equals the accuracy computed from all predictions at once."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.trainer_utils import EvalPrediction

from utils.flags.arguments import LMTrainingArguments
from utils.data.collators import CausalLMCollator
from utils.model.metrics import TokenAccuracy
from utils.train.trainer import LMTrainer


def full_accuracy(predictions: np.ndarray, labels: np.ndarray, shift: bool) -> float:
    """What evaluate's accuracy metric gives after preprocess_logits_for_metrics, on all of it."""
    if shift:
        predictions, labels = predictions[:, :-1], labels[:, 1:]
    keep = labels != -100
    return float((predictions[keep] == labels[keep]).mean())


@pytest.mark.parametrize("shift", [False, True])
def test_batches_of_different_lengths_add_up_to_the_full_accuracy(shift):
    generator = torch.Generator().manual_seed(0)
    metric = TokenAccuracy(shift=shift)
    all_predictions, all_labels = [], []
    for length in (7, 12, 5):  # batches padded to different lengths, as Trainer pads them
        logits = torch.randn(4, length, 11, generator=generator)
        labels = torch.randint(0, 11, (4, length), generator=generator)
        labels[torch.rand(4, length, generator=generator) < 0.4] = -100
        predictions = TokenAccuracy.preprocess_logits(logits, labels)
        # Make some predictions right, so that the accuracy is not near zero by chance.
        target = labels.roll(-1, dims=1) if shift else labels
        predictions = torch.where(torch.rand(4, length, generator=generator) < 0.5, target.clamp(min=0), predictions)
        result = metric(EvalPrediction(predictions=predictions, label_ids=labels), compute_result=length == 5)
        padded = torch.full((4, 12), -100)
        padded_labels = padded.clone()
        padded[:, :length], padded_labels[:, :length] = predictions, labels
        all_predictions.append(padded.numpy())
        all_labels.append(padded_labels.numpy())
    expected = full_accuracy(np.concatenate(all_predictions), np.concatenate(all_labels), shift)
    assert 0.3 < expected < 0.9
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metric.total == 0  # reset after the final batch


def test_trainer_evaluation_equals_full_prediction_accuracy(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    ids = torch.randint(0, 50, (13, 16))
    ids[:, 8:] = ids[:, :8]  # repeated halves: a partly predictable sequence
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    args = LMTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none",
                               use_cpu=True)
    trainer = LMTrainer(model=model, args=args, eval_dataset=dataset, data_collator=CausalLMCollator(),
                        accuracy=TokenAccuracy(shift=True))
    # Train a little so that the predictions are not all the same token.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = trainer.evaluate()

    model.eval()
    with torch.no_grad():
        predictions = model(input_ids=ids).logits.argmax(-1).numpy()
    expected = full_accuracy(predictions, ids.numpy(), shift=True)
    assert 0.05 < expected < 1.0
    assert metrics["eval_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-9)
