"""The evaluation loss as a mean over tokens: each predicted token weighs the same, whatever sample it is in.

The Trainer's eval loss is the mean of its batches' mean losses, each batch weighing by its
samples. Where samples hold different numbers of predicted tokens (packed documents leave
padding; masking draws a varying count) that makes a token of a sparse batch weigh more than one
of a full batch. Here each sample's summed loss and its number of predicted tokens are gathered
the way the Trainer gathers predictions (so the samples a distributed evaluation repeats to even
out its last batches are dropped), and the loss is the ratio of their totals.
"""

from __future__ import annotations

import torch

from utils.model.metrics import IGNORE_INDEX


class TokenWeightedLoss:
    """Summed loss and token count over an evaluation; ``shift``: a causal LM (position i predicts token i + 1)."""

    def __init__(self, shift: bool):
        self.shift = shift
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, gather) -> None:
        """One batch: ``gather`` (the Trainer's ``gather_for_metrics``) brings every process's samples."""
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        # A sample at a time: the fp32 copy of the scores stays one sample's size.
        sums = torch.stack([torch.nn.functional.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX,
                                                              reduction="sum")
                            for scores, targets in zip(logits, labels)])
        self._add(sums, labels.ne(IGNORE_INDEX).sum(-1).to(sums.dtype), gather)

    def observe_labelled(self, logits: torch.Tensor, labelled: torch.Tensor, labels: torch.Tensor, gather) -> None:
        """One batch whose scores are at its labelled positions only (utils/model/labelled_positions.py):
        ``logits`` for the ``labelled`` labels, which are the batch's ``labels`` other than IGNORE_INDEX, in order."""
        kept = labelled != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits[kept].float(), labelled[kept], reduction="none")
        samples = labels.ne(IGNORE_INDEX).nonzero()[:, 0]  # the sample of each labelled position, in the same order
        sums = torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, samples, losses)
        self._add(sums, labels.ne(IGNORE_INDEX).sum(-1).to(sums.dtype), gather)

    def _add(self, sums: torch.Tensor, counts: torch.Tensor, gather) -> None:
        totals = gather(torch.stack([sums, counts], dim=1)).double().sum(0).tolist()
        self.loss_sum += totals[0]
        self.tokens += round(totals[1])

    def result(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")
