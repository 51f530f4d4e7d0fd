"""The evaluation loss as a mean over tokens, for samples that predict different numbers of them.

The Trainer's eval loss is the mean of its batches' mean losses, each batch weighing by its
samples. Where samples hold different numbers of predicted tokens (packed documents leave
padding, masking draws a varying count, a sliding window scores only the tokens the one before
did not) that makes a token of a sparse batch weigh more than one of a full batch. Here each
sample's summed loss and its count of predicted tokens are gathered the way the Trainer gathers
predictions (so the samples a distributed evaluation repeats to even out its last batches drop
out), and summed in float64.
"""

from __future__ import annotations

import torch

from utils.model.metrics import IGNORE_INDEX


class TokenLossSum:
    """Summed loss and predicted tokens over one evaluation; ``shift``: a causal LM (position i predicts token i + 1)."""

    def __init__(self, shift: bool):
        self.shift = shift
        self.loss_sum = 0.0
        self.tokens = 0

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, gather) -> None:
        """One batch: ``gather`` (the Trainer's ``gather_for_metrics``) brings every process's samples."""
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        # One sample at a time: the fp32 copy of the scores stays one sample's size.
        sums = torch.stack([torch.nn.functional.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX,
                                                              reduction="sum")
                            for scores, targets in zip(logits, labels)])
        self._add(sums, labels, gather)

    def observe_labelled(self, logits: torch.Tensor, labelled: torch.Tensor, labels: torch.Tensor, gather) -> None:
        """One batch scored at its labelled positions only (utils/model/labelled_positions.py): ``logits`` for the
        ``labelled`` labels, which are the batch's ``labels`` other than IGNORE_INDEX, in order."""
        kept = labelled != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits[kept].float(), labelled[kept], reduction="none")
        samples = labels.ne(IGNORE_INDEX).nonzero()[:, 0]  # the sample of each labelled position, in that order
        sums = torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, samples, losses)
        self._add(sums, labels, gather)

    def _add(self, sums: torch.Tensor, labels: torch.Tensor, gather) -> None:
        counts = labels.ne(IGNORE_INDEX).sum(-1).to(sums.dtype)
        totals = gather(torch.stack([sums, counts], dim=1)).double().sum(0).tolist()
        self.loss_sum += totals[0]
        self.tokens += round(totals[1])

    def mean(self, expected_tokens: int | None = None) -> float:
        """The mean loss per predicted token; ``expected_tokens``: how many the evaluation must have scored
        (sliding windows: each token once)."""
        if expected_tokens is not None and self.tokens != expected_tokens:
            raise RuntimeError(f"the evaluation scored {self.tokens} tokens where its windows hold "
                               f"{expected_tokens}: some were left out or scored twice")
        return self.loss_sum / self.tokens if self.tokens else float("nan")
