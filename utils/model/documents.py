"""Which models keep packed documents apart (``--packing document``), and what each needs for it.

A packed block holds several documents, and the batch says where each starts by ``position_ids``
that restart in every document (utils/data/packing.py). With those and no ``attention_mask``,
transformers' own mask code lets each token attend only inside its document for some families;
others ignore the position ids in their mask and would let every token attend to the whole block.
Each family below was proven against one document at a time, fp32 logits within 1e-5
(tests/test_packing.py), with the attention kernels in ``PROVEN_ATTENTION``; every other model
class is refused with one line, so a run never mixes documents without a word.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_bidirectional_mask

from utils.errors import UsageError
from utils.model.loading import first_position_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A model family proven to keep documents apart, and what its forward needs for that."""

    classes: tuple[str, ...]  # the model classes proven (transformers' own, of this family's module)
    no_cache: bool = False  # builds a cache in training unless told not to, and with one ignores the positions
    block_mask: bool = False  # ignores the positions in its mask: it is given a 4D block mask instead


FAMILIES = {
    "gpt2": Family(("GPT2LMHeadModel",), no_cache=True),
    "bert": Family(("BertForMaskedLM",)),
    "roberta": Family(("RobertaForMaskedLM",)),
    "distilbert": Family(("DistilBertForMaskedLM",), block_mask=True),
    "albert": Family(("AlbertForMaskedLM",), block_mask=True),
}
PROVEN_ATTENTION = ("sdpa", "eager")


def prepared_for_documents(model) -> int:
    """Set ``model`` up for batches of packed documents; the position id each document starts at.

    Refuses (``UsageError``) a model class, or an attention kernel, not proven to keep them apart.
    """
    family = _family_of(model)
    attention = model.config._attn_implementation
    if attention not in PROVEN_ATTENTION:
        raise UsageError(f"--packing document with --attn_implementation {attention}: documents are proven kept "
                         f"apart with {' and '.join(PROVEN_ATTENTION)} only; pick one of those")
    model.register_forward_pre_hook(_DocumentInputs(family), with_kwargs=True)
    how = "a block mask built from the position ids" if family.block_mask else "transformers' mask from the position ids"
    logger.info("--packing document: %s keeps each document to itself (%s)", type(model).__name__, how)
    return first_position_id(model.config)


def _family_of(model) -> Family:
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    # The class must be transformers' own of that family: a remote-code model could claim its model_type.
    if family is None or type(model).__name__ not in family.classes or \
            type(model).__module__ != f"transformers.models.{model_type}.modeling_{model_type}":
        proven = ", ".join(f"{name} ({'/'.join(f.classes)})" for name, f in FAMILIES.items())
        raise UsageError(f"--packing document: {type(model).__name__} ({model_type}) is not proven to keep packed "
                         f"documents apart; it works for {proven}; train this model without --packing document")
    return family


class _DocumentInputs:
    """A forward pre-hook: what this family needs besides the batch's ``position_ids`` to see one document at a time."""

    def __init__(self, family: Family):
        self.family = family

    def __call__(self, module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # not a packed batch
            return None
        if self.family.no_cache:
            kwargs["use_cache"] = False
        if self.family.block_mask and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = block_mask(module, position_ids)
        return args, kwargs


def block_mask(model, position_ids: torch.Tensor):
    """The 4D mask transformers would build from ``position_ids`` (tokens attend within their document), in the
    form the model's attention kernel takes (boolean for sdpa, additive in the embeddings' dtype for eager)."""
    dtype = model.get_input_embeddings().weight.dtype
    # What the mask code reads of the embeddings: their shape, dtype and device.
    shape_only = torch.empty((*position_ids.shape, 0), dtype=dtype, device=position_ids.device)
    return create_bidirectional_mask(config=model.config, inputs_embeds=shape_only, attention_mask=None,
                                     position_ids=position_ids)
