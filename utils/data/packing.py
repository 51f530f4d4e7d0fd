"""``--packing document``: whole documents in blocks, positions restarting in each, batches of such blocks.

A document is a row of the data (a line, paragraph or file of text: ``--sample_by``; a JSON or
CSV row). Each ends with the tokenizer's end-of-text token where the tokenizer ends texts with
no special token of its own (GPT-2); one longer than the block is cut into block-sized pieces,
each its own document. The pieces go into blocks by best-fit decreasing (longest first, each
into the fullest block it still fits in), within each piece of rows the preparation hands over
(utils/data/prepare.py: 10,000 rows, 1,000 when streamed); a block's free slots are padding,
added per batch.

A stored block is its ``input_ids`` (no padding) and its ``position_ids``, which restart at the
model's first position id in every document: from them the model keeps each document to itself
(utils/model/documents.py) and the collators below tell where documents start and where the
padding is. Padding gets no label and is never masked, so no loss, accuracy or mask draws on it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from utils.data.arrow_files import write_batches
from utils.data.collators import MaskedLMCollator
from utils.data.fast_tokenize import Unsupported, wrapping_ids
from utils.errors import UsageError

logger = logging.getLogger(__name__)

PACKINGS = ("concat", "document")  # --packing: the stock concatenation (the default), or whole documents
UNLABELLED = -100  # the label the loss skips (torch's and transformers' ignore_index)
PAD_MULTIPLE = 8  # batches are padded to a multiple of 8 tokens, which tensor cores use well

_SCHEMA = pa.schema({"input_ids": pa.list_(pa.int32()), "position_ids": pa.list_(pa.int32())})


def end_of_document_id(tokenizer) -> int | None:
    """The token every document ends with: the tokenizer's EOS where it ends texts with nothing (GPT-2);
    None where it ends them itself ([SEP], </s>, ...)."""
    try:
        _, suffix = wrapping_ids(tokenizer)
    except Unsupported:
        suffix = []
    if suffix:
        return None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"--packing document: the tokenizer {tokenizer.name_or_path} ends texts with no special "
                         "token and has no eos_token to end each document with; pass --tokenizer_name with one "
                         "that has")
    return tokenizer.eos_token_id


class DocumentPacker:
    """Token ids of documents in, blocks of ``seq_len`` holding whole documents out."""

    def __init__(self, tokenizer, seq_len: int, first_position: int):
        self.seq_len = seq_len
        self.first_position = first_position  # the model's (utils/model/documents.py)
        self.end_id = end_of_document_id(tokenizer)

    def key(self) -> dict:
        """What decides the blocks besides the text and the tokenizer, for the tokenized-data cache."""
        return {"packing": "document", "first_position": self.first_position, "end_id": self.end_id}

    def pack(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents given one after the other (``ids``, and the length of each) as blocks:
        ``(token ids, position ids, block lengths)``, the blocks one after the other."""
        ids, lengths = self._ended(ids.astype(np.int32, copy=False), np.asarray(lengths, np.int64))
        pieces = self._pieces(lengths)
        block_of = best_fit(pieces, self.seq_len)
        order = np.argsort(block_of, kind="stable")  # by block, in their order within it
        starts = np.cumsum(pieces) - pieces
        placed = pieces[order]
        placed_starts = np.cumsum(placed) - placed
        within = np.arange(int(placed.sum())) - np.repeat(placed_starts, placed)  # each token's place in its piece
        tokens = ids[np.repeat(starts[order], placed) + within]
        positions = (within + self.first_position).astype(np.int32)
        blocks = np.bincount(block_of, weights=pieces).astype(np.int64)
        return tokens, positions, blocks

    def _ended(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.end_id is None:
            return ids, lengths
        return np.insert(ids, np.cumsum(lengths), self.end_id), lengths + 1

    def _pieces(self, lengths: np.ndarray) -> np.ndarray:
        """The documents' lengths, each longer than a block cut into full blocks and the rest."""
        full, rest = lengths // self.seq_len, lengths % self.seq_len
        counts = full + (rest > 0)
        pieces = np.full(int(counts.sum()), self.seq_len, np.int64)
        last = np.cumsum(counts) - 1
        pieces[last[rest > 0]] = rest[rest > 0]
        return pieces

    def write(self, pieces: Iterable[tuple[np.ndarray, np.ndarray]], path: str) -> Dataset:
        """Blocks of each piece of documents (``(ids, lengths)``), written to an Arrow file piece by piece."""
        counts = {"documents": 0, "tokens": 0, "blocks": 0}

        def batches():
            for ids, lengths in pieces:
                tokens, positions, blocks = self.pack(ids, lengths)
                counts["documents"] += len(lengths)
                counts["tokens"] += len(tokens)
                counts["blocks"] += len(blocks)
                offsets = pa.array(np.concatenate([[0], np.cumsum(blocks)]).astype(np.int32))
                yield pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(tokens)),
                                       pa.ListArray.from_arrays(offsets, pa.array(positions))], schema=_SCHEMA)

        write_batches(path, _SCHEMA, batches())
        if counts["blocks"]:
            logger.info("--packing document: %d documents, %d tokens in %d blocks of %d (%.1f%% of their slots)",
                        counts["documents"], counts["tokens"], counts["blocks"], self.seq_len,
                        100 * counts["tokens"] / (counts["blocks"] * self.seq_len))
        return Dataset.from_file(path)

    def pack_rows(self, batch: dict) -> dict:
        """``Dataset.map`` of tokenized rows (a stream's) into blocks."""
        lists = batch["input_ids"]
        ids = np.fromiter(itertools.chain.from_iterable(lists), np.int32)
        tokens, positions, blocks = self.pack(ids, np.fromiter(map(len, lists), np.int64, count=len(lists)))
        cuts = np.cumsum(blocks)[:-1]
        return {"input_ids": np.split(tokens, cuts) if len(blocks) else [],
                "position_ids": np.split(positions, cuts) if len(blocks) else []}


def best_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The block of each piece by best-fit decreasing: longest first, each into the fullest block it fits in,
    a new block when none; blocks numbered as they are opened. Every length must be 1 to ``capacity``."""
    blocks = np.empty(len(lengths), np.int64)
    by_room = [[] for _ in range(capacity + 1)]  # open blocks by their free room
    has_room = np.zeros(capacity + 1, bool)
    opened = 0
    for piece in np.argsort(-lengths, kind="stable"):
        need = int(lengths[piece])
        room = need + int(has_room[need:].argmax())  # the least room that fits, if any
        if has_room[room]:
            block = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            block, room, opened = opened, capacity, opened + 1
        blocks[piece] = block
        if room > need:
            by_room[room - need].append(block)
            has_room[room - need] = True
    return blocks


# ---------------------------------------------------------------------------- batches of blocks


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, length], padded
    position_ids: torch.Tensor  # restarting in every document; the padding's at the first position
    real: torch.Tensor  # bool: not padding
    starts: torch.Tensor  # bool: a document's first token


def pad_blocks(examples, pad_id: int) -> PackedBatch:
    """Blocks of different lengths as one batch, padded to the longest (a multiple of ``PAD_MULTIPLE``).

    The padding's position ids all stay at the first position: no padded position lies beyond the model's
    table, and each padding token is a document of one that no real token attends to.
    """
    ids = [np.asarray(e["input_ids"]) for e in examples]
    positions = [np.asarray(e["position_ids"]) for e in examples]
    first = int(positions[0][0])
    longest = max(len(row) for row in ids)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = np.full((len(ids), length), pad_id, np.int64)
    position_ids = np.full((len(ids), length), first, np.int64)
    real = np.zeros((len(ids), length), bool)
    for row, (tokens, places) in enumerate(zip(ids, positions)):
        input_ids[row, :len(tokens)] = tokens
        position_ids[row, :len(places)] = places
        real[row, :len(tokens)] = True
    position_ids_t, real_t = torch.from_numpy(position_ids), torch.from_numpy(real)
    return PackedBatch(torch.from_numpy(input_ids), position_ids_t, real_t, real_t & (position_ids_t == first))


def _pad_id(tokenizer) -> int:
    # Any id would do (padding is unlabelled and attended by nothing real); GPT-2 has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


class PackedCausalLMCollator:
    """Causal LM batches of packed blocks: no label on padding, nor on a document's first token (which
    the model would otherwise predict from the end of the document before it)."""

    def __init__(self, tokenizer):
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, examples) -> dict:
        batch = pad_blocks(examples, self.pad_id)
        labels = batch.input_ids.masked_fill(~batch.real | batch.starts, UNLABELLED)
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": labels}


@dataclass
class PackedMaskedLMCollator(MaskedLMCollator):
    """Masked LM batches of packed blocks: dynamic masking, never of special tokens or padding."""

    def torch_call(self, examples) -> dict:
        batch = pad_blocks(examples, _pad_id(self.tokenizer))
        special_ids = torch.tensor(self.tokenizer.all_special_ids)
        unmaskable = torch.isin(batch.input_ids, special_ids) | ~batch.real
        input_ids, labels = self.torch_mask_tokens(batch.input_ids, special_tokens_mask=unmaskable)
        return {"input_ids": input_ids, "position_ids": batch.position_ids, "labels": labels}
