"""Batch builders for the three objectives. Labels and masks are made here, per batch."""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorForPermutationLanguageModeling


def _input_ids(examples) -> list:
    return [e["input_ids"] if isinstance(e, Mapping) else e for e in examples]


def _stack(rows: list) -> torch.Tensor:
    """Equal-length rows (lists, NumPy arrays or tensors) as one int64 batch."""
    if isinstance(rows[0], np.ndarray):
        # torch.as_tensor walks a list of arrays element by element, which is very slow.
        return torch.from_numpy(np.stack(rows)).long()
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows).long()
    return torch.as_tensor(rows, dtype=torch.long)


class CausalLMCollator:
    """Stacks equal-length blocks; the labels are the inputs (the model shifts them), or the samples' own
    where they bring them (evaluation windows, scored on some of their tokens: utils/eval/windows.py)."""

    def __call__(self, examples) -> dict:
        input_ids = _stack(_input_ids(examples))
        if isinstance(examples[0], Mapping) and "labels" in examples[0]:
            return {"input_ids": input_ids, "labels": _stack([e["labels"] for e in examples])}
        return {"input_ids": input_ids, "labels": input_ids.clone()}


@dataclass
class MaskedLMCollator(DataCollatorForLanguageModeling):
    """Dynamic masking, with the special-token mask computed on the whole batch at once."""

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, **kwargs):
        if special_tokens_mask is None:
            # The parent asks the tokenizer row by row in Python; one isin does the same.
            special_ids = torch.tensor(self.tokenizer.all_special_ids, device=inputs.device)
            special_tokens_mask = torch.isin(inputs, special_ids)
        return super().torch_mask_tokens(inputs, special_tokens_mask, **kwargs)


@dataclass
class PermutationLMCollator(DataCollatorForPermutationLanguageModeling):
    """XLNet's permutation objective; pads each batch to an even length, which the objective needs."""

    def torch_call(self, examples) -> dict:
        rows = [torch.as_tensor(ids, dtype=torch.long) for ids in _input_ids(examples)]
        length = max(len(row) for row in rows)
        length += length % 2
        batch = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.tokenizer.padding_side == "left":
                batch[i, length - len(row):] = row
            else:
                batch[i, : len(row)] = row
        inputs, perm_mask, target_mapping, labels = self.torch_mask_tokens(batch)
        return {"input_ids": inputs, "perm_mask": perm_mask, "target_mapping": target_mapping, "labels": labels}
