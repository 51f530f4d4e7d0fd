"""The evaluation loss as a mean over tokens, for samples that are scored on different numbers of them.

The Trainer's eval loss is the mean of its batches' mean losses, each batch weighing by its
samples: a token of a sliding window that scores few tokens would weigh more than one of a window
that scores many. Here each sample's summed loss and its count of scored tokens are gathered the
way the Trainer gathers predictions (so the samples a distributed evaluation repeats to even out
its last batches drop out), and summed in float64.
"""

from __future__ import annotations

import torch

from utils.model.metrics import IGNORE_INDEX


class TokenLossSum:
    """Summed loss and scored tokens over one evaluation; position i of a sample predicts token i + 1."""

    def __init__(self):
        self.loss_sum = 0.0
        self.tokens = 0

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, gather) -> None:
        """One batch: ``gather`` (the Trainer's ``gather_for_metrics``) brings every process's samples."""
        logits, labels = logits[:, :-1], labels[:, 1:]
        # One sample at a time: the fp32 copy of the scores stays one sample's size.
        sums = torch.stack([torch.nn.functional.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX,
                                                              reduction="sum")
                            for scores, targets in zip(logits, labels)])
        counts = labels.ne(IGNORE_INDEX).sum(-1).to(sums.dtype)
        totals = gather(torch.stack([sums, counts], dim=1)).double().sum(0).tolist()
        self.loss_sum += totals[0]
        self.tokens += round(totals[1])

    def mean(self, expected_tokens: int) -> float:
        """The mean loss per scored token; every token the windows score must have been scored once."""
        if self.tokens != expected_tokens:
            raise RuntimeError(f"the evaluation scored {self.tokens} tokens where its windows hold "
                               f"{expected_tokens}: some were left out or scored twice")
        return self.loss_sum / self.tokens if self.tokens else float("nan")
