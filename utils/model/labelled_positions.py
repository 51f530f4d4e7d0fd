"""The output head and the loss at the positions that have a label only.

A masked LM's head (a dense layer, a norm and the output layer onto the vocabulary) runs at every
position, while only the masked ones, 15% by default, have a label: the other 85% of the
``[tokens, vocabulary]`` logits are computed, and a gradient of zeros is pushed back through
them, for nothing. At a small width that head is most of a training step. XLNet's permutation
objective is the same story: transformers' collator maps every position to a prediction (an
identity ``target_mapping``), so the query stream's feed-forward layers and the head run at every
position while about one in six is a target.

``LabelledPositions.of(model)`` gives what fits the model:

* ``MaskedHead`` (BERT, RoBERTa, DistilBERT, ALBERT): a hook on the head's first layer hands it
  the hidden states of the labelled positions only, and the model's own loss gets their labels
  only;
* ``PermutationTargets`` (XLNet): the rows of ``target_mapping`` and of the labels that name a
  labelled target, the others dropped (rows of the batch with fewer targets are padded with
  unlabelled rows that map to no position).

Either way the model computes the same cross-entropy over the same positions with the same
gradients (the positions without a label get none either way), up to float rounding; the
logits it returns hold the labelled positions only, and ``spread`` puts their argmax ids back at
their places in the batch, which is all the accuracy reads.
"""

from __future__ import annotations

import abc
import contextlib

import torch

from utils.model.metrics import IGNORE_INDEX

# The module each masked LM hands its encoder output to: the head's first layer. The models' own
# loss is a cross-entropy over ``logits.view(-1, vocabulary)`` and ``labels.view(-1)``, which
# takes the labelled rows alone unchanged (tests/test_labelled_positions.py checks each against
# its full head, forward and gradients).
HEAD_ENTRY = {"bert": "cls", "roberta": "lm_head", "distilbert": "vocab_transform", "albert": "predictions"}


class LabelledPositions(abc.ABC):
    """The head and the loss at the labelled positions: ``labelled_only`` around the model's forward and loss."""

    @staticmethod
    def of(model) -> LabelledPositions | None:
        """What fits ``model``, or None when its head already runs where the loss looks (or is not known here)."""
        model_type = getattr(model.config, "model_type", None)
        if model_type == "xlnet":
            return PermutationTargets()
        entry = getattr(model, HEAD_ENTRY[model_type], None) if model_type in HEAD_ENTRY else None
        return MaskedHead(entry) if isinstance(entry, torch.nn.Module) else None

    @abc.abstractmethod
    def labelled_only(self, inputs: dict) -> contextlib.AbstractContextManager[dict]:
        """A context giving ``inputs`` with the labelled positions' labels only, the model set to predict those."""

    @staticmethod
    def spread(logits: torch.Tensor, labelled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The argmax ids of ``logits`` (or the ids themselves), predicted for the ``labelled`` labels that
        ``labelled_only`` gave, at their places in the batch's ``labels``; IGNORE_INDEX where nothing was."""
        ids = logits.argmax(-1) if logits.is_floating_point() else logits
        predictions = torch.full(labels.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        predictions[labels != IGNORE_INDEX] = ids[labelled != IGNORE_INDEX].to(labels.dtype)
        return predictions


class MaskedHead(LabelledPositions):
    """A masked LM's head at the labelled positions while ``labelled_only`` is open.

    Outside it (generation, a user's own forward pass) the head runs at every position as usual.
    """

    def __init__(self, entry: torch.nn.Module):
        self.rows: torch.Tensor | None = None  # flat indices of the labelled positions, while open
        entry.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.rows is None:
            return None
        hidden, *rest = args
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows), *rest)

    @contextlib.contextmanager
    def labelled_only(self, inputs: dict):
        labels = inputs["labels"].reshape(-1)
        self.rows = labels.ne(IGNORE_INDEX).nonzero().squeeze(1)
        try:
            yield {**inputs, "labels": labels.index_select(0, self.rows)}
        finally:
            self.rows = None


class PermutationTargets(LabelledPositions):
    """XLNet's targets cut to the labelled ones: ``target_mapping`` ``[batch, targets, length]``."""

    @contextlib.contextmanager
    def labelled_only(self, inputs: dict):
        mapping, labels = inputs.get("target_mapping"), inputs["labels"]
        if mapping is None:  # no targets named: XLNet predicts at every position
            yield inputs
            return
        labelled = labels != IGNORE_INDEX
        counts = labelled.sum(1)
        width = max(int(counts.max()), 1)
        # Each row's labelled targets first, in order (a stable sort of "not labelled"), then padding.
        rows = torch.argsort((~labelled).to(torch.int8), dim=1, stable=True)[:, :width]
        real = torch.arange(width, device=labels.device) < counts.unsqueeze(1)
        mapping = mapping.gather(1, rows.unsqueeze(2).expand(-1, -1, mapping.shape[2])) * real.unsqueeze(2)
        yield {**inputs, "target_mapping": mapping, "labels": labels.gather(1, rows).masked_fill(~real, IGNORE_INDEX)}
