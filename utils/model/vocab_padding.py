"""``--pad_vocab_to_multiple_of N``: the vocabulary matrices padded to a multiple of N rows, saved at the true size.

GPU matrix products run fastest when their sizes are multiples of the tensor cores' tiles, and
GPT-2's 50,257 entries are not one: published GPU ladders for GPT-2 124M gained 13.6% on an A100
from padding them to 50,304. Opt-in, for the GPU (on a CPU it only adds work):

* the input and output embeddings get rows up to the multiple (zeros);
* the padded entries' scores are set to -inf right after the output layer (and in the chunked
  loss, utils/model/chunked_loss.py), so the softmax, the loss, the gradients and the argmax are
  those of the true vocabulary: the padded rows get no gradient and nothing changes but speed;
* what is saved, the final model and every checkpoint, holds the true rows and ``vocab_size``, so
  stock transformers code loads it as the model it is; a checkpoint loaded back into the padded
  model (resuming) gets its zero rows again.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_vocab_padding"  # where the model carries its VocabPadding


class VocabPadding:
    """A model's vocabulary padded from ``true`` to ``padded`` rows: the masking, saving and loading of it."""

    def __init__(self, model, true: int, padded: int):
        self.true, self.padded = true, padded
        matrices = {id(t) for module in (model.get_input_embeddings(), model.get_output_embeddings())
                    if module is not None for t in (module.weight, getattr(module, "bias", None)) if t is not None}
        # Every name a padded matrix goes by (tied ones have several: GPT-2's lm_head.weight is wte.weight).
        self.names = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in matrices}
        output = model.get_output_embeddings()
        if output is not None:
            output.register_forward_hook(self._mask_scores)
        model.register_load_state_dict_pre_hook(self._pad_loaded)

    @staticmethod
    def of(model) -> VocabPadding | None:
        return getattr(model, _ATTRIBUTE, None)

    def _mask_scores(self, module, args, scores):
        if isinstance(scores, torch.Tensor) and scores.shape[-1] == self.padded:  # not hidden states passed through
            scores[..., self.true:] = float("-inf")
        return scores

    def _pad_loaded(self, module, state_dict, prefix, *args):
        for name in self.names:
            key = prefix + name
            tensor = state_dict.get(key)
            if tensor is not None and tensor.shape[0] == self.true:
                rows = (self.padded - self.true, *tensor.shape[1:])
                state_dict[key] = torch.cat([tensor, tensor.new_zeros(rows)])

    def cut(self, state_dict: dict) -> dict:
        """``state_dict`` with the padded matrices at their true rows."""
        return {name: tensor[:self.true] if name in self.names and tensor.shape[0] == self.padded else tensor
                for name, tensor in state_dict.items()}

    @contextlib.contextmanager
    def true_size(self, config):
        """``config.vocab_size`` at the true size while the model is saved."""
        config.vocab_size = self.true
        try:
            yield
        finally:
            config.vocab_size = self.padded


def pad_vocabulary(model, multiple: int) -> VocabPadding | None:
    """Pad ``model``'s vocabulary matrices to a multiple of ``multiple`` rows (None: already one)."""
    true = model.get_input_embeddings().weight.shape[0]
    padded = math.ceil(true / multiple) * multiple
    if padded == true:
        logger.info("Vocabulary: %d entries, already a multiple of %d", true, multiple)
        return None
    model.resize_token_embeddings(padded, mean_resizing=False)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if tensor is not None:
                    tensor[true:] = 0
    padding = VocabPadding(model, true, padded)
    setattr(model, _ATTRIBUTE, padding)
    logger.info("Vocabulary: %d entries padded to %d (--pad_vocab_to_multiple_of %d); saved at %d", true, padded,
                multiple, true)
    return padding
