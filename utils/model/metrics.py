"""Evaluation metrics computed batch by batch, so memory does not grow with the evaluation set."""

import math

import torch

IGNORE_INDEX = -100  # label value of positions that are not predicted


class TokenAccuracy:
    """Share of predicted tokens equal to their label, counted over the whole evaluation.

    Used as ``compute_metrics`` with ``batch_eval_metrics``: the Trainer hands over one batch of
    argmax predictions at a time (see :meth:`preprocess_logits`), and only two counters are kept.
    ``shift=True`` scores causal LMs, where the logits at position i predict the token at i + 1.
    """

    def __init__(self, shift: bool = False):
        self.shift = shift
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    @staticmethod
    def preprocess_logits(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        if not logits.is_floating_point():
            return logits  # already the argmax ids (--loss_chunk_size, utils/model/chunked_loss.py)
        return logits.argmax(dim=-1)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        if self.shift:
            predictions, labels = predictions[:, :-1], labels[:, 1:]
        scored = labels != IGNORE_INDEX
        self.correct += int((predictions[scored] == labels[scored]).sum())
        self.total += int(scored.sum())

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict:
        self.update(torch.as_tensor(eval_prediction.predictions), torch.as_tensor(eval_prediction.label_ids))
        result = {"accuracy": self.correct / self.total if self.total else float("nan")}
        if compute_result:
            self.reset()
        return result


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
