"""run_clm.py's evaluation text: one token stream with its text units, cut into disjoint blocks or sliding windows.

The stream is the one the grouped samples are cut from (utils/data/prepare.py): every row of the
validation split (a line with its line break, for text files) tokenized as the sample recipe
tokenizes it, the rows one after the other. It is read here with the tokenizer's character
offsets, so that the text each token owns is known (utils/eval/text_units.py); a tokenizer
without offsets (a slow one) gives the stream without them, and no per-byte or per-word figures.

Without ``--eval_stride`` the stream is cut into the disjoint blocks the grouped samples are;
with it, into sliding windows (utils/eval/windows.py). Only the tokens the evaluated windows need
are read (``--max_eval_samples`` windows; under ``--streaming`` STREAM_EVAL_SAMPLES unless told).
Like the samples, a stream read from prepared (not streamed) rows is kept in the tokenized-data
cache (utils/data/cache.py), under a key of the text, the tokenizer and the tokens read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from datasets import Dataset, IterableDataset

from utils.data.arrow_files import write_batches
from utils.data.cache import tokenizer_digest
from utils.errors import UsageError
from utils.eval.text_units import TextStream, read_stream
from utils.eval.windows import ScoredWindows, blocks, sliding

logger = logging.getLogger(__name__)

STREAM_FORMAT = 1  # bump when the stored layout of a stream changes
TEXT_ROWS = 1000  # rows of text tokenized at a time


def causal_evaluation(block: int, stride: int | None, documents) -> CausalEvaluation | None:
    """run_clm.py's evaluation: over the token stream, or None where ``documents`` (--packing document) are
    evaluated as they are trained, each packed whole and apart."""
    if documents is None:
        return CausalEvaluation(block, stride)
    if stride is not None:
        raise UsageError(f"--eval_stride {stride} with --packing document: sliding windows run over the text as one "
                         "stream, while packed documents are evaluated whole and apart; use one of the two")
    return None


class CausalEvaluation:
    """How run_clm.py evaluates: blocks of ``block`` tokens, or windows that advance by ``stride``."""

    def __init__(self, block: int, stride: int | None):
        if stride is not None and not 0 < stride < block:
            raise UsageError(f"--eval_stride {stride}: give a number from 1 to {block - 1} (below --block_size "
                             f"{block}, so that each window overlaps the one before and every token is scored "
                             "with context); leave it out to evaluate disjoint blocks")
        self.block, self.stride = block, stride

    def samples(self, recipe, rows, max_samples: int | None, cached) -> ScoredWindows:
        """The evaluation samples of the split ``rows``: at most ``max_samples`` windows.

        ``recipe``: the split's SampleRecipe (its tokenizer, text column and tokenization);
        ``cached(recipe, max_samples)``: what the tokenized-data cache holds for ``rows``.
        """
        offsets = bool(getattr(recipe.tokenizer, "is_fast", False))
        if not offsets:
            logger.warning("The tokenizer %s gives no character offsets (it is not a fast tokenizer): no bits per "
                           "byte, byte or word perplexity", type(recipe.tokenizer).__name__)
        reader = StreamReader(recipe, offsets)
        need = self.tokens_needed(max_samples)
        if isinstance(rows, IterableDataset):
            stream = reader.read(rows, need)
        else:
            stream = stream_of(cached(reader, need))
        windows = self.windows(len(stream))[:max_samples]
        return ScoredWindows(stream, windows)

    def tokens_needed(self, max_windows: int | None) -> int | None:
        """The tokens that ``max_windows`` windows read (None: the whole split)."""
        if max_windows is None:
            return None
        if self.stride is None:
            return max_windows * self.block
        return (max_windows - 1) * self.stride + self.block

    def windows(self, length: int) -> np.ndarray:
        if self.stride is None:
            return blocks(length, self.block)
        return sliding([(0, length)], self.block, self.stride)  # the grouped text is one document


class StreamReader:
    """A split's token stream with its text units; the tokenized-data cache's recipe for it (``key``, ``build``)."""

    def __init__(self, recipe, offsets: bool):
        self.recipe = recipe
        self.offsets = offsets

    def read(self, rows, need: int | None) -> TextStream:
        """The stream of ``rows`` (prepared or streamed) up to ``need`` tokens (None: all)."""
        return read_stream(self._encode, self._texts(rows), need, self.offsets)

    def _encode(self, texts: list[str]) -> dict:
        return self.recipe.tokenize({self.recipe.column: texts}, offsets=self.offsets)

    def _texts(self, rows) -> Iterator[list[str]]:
        for batch in rows.iter(batch_size=TEXT_ROWS):
            yield batch[self.recipe.column]

    def key(self, source_fingerprint: str, max_tokens: int | None) -> str:
        parts = {"stream_format": STREAM_FORMAT, "source": source_fingerprint,
                 "tokenizer": tokenizer_digest(self.recipe.tokenizer), "column": self.recipe.column,
                 "offsets": self.offsets, "max_tokens": max_tokens}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def build(self, rows: Dataset, max_tokens: int | None, workdir: str) -> Dataset:
        stream = self.read(rows, max_tokens)
        columns = {"input_ids": pa.array(stream.ids, pa.int32())}
        starts = np.zeros(len(stream), bool)
        starts[stream.doc_starts] = True
        columns["doc_start"] = pa.array(starts)
        if stream.has_units:
            columns["bytes"] = pa.array(stream.bytes, pa.int32())
            columns["words"] = pa.array(stream.words, pa.int32())
        table = pa.table(columns)
        path = os.path.join(workdir, "stream.arrow")
        write_batches(path, table.schema, table.to_batches())
        return Dataset.from_file(path)


def stream_of(table: Dataset) -> TextStream:
    """The stream a cache entry holds (StreamReader.build)."""
    def column(name: str) -> np.ndarray | None:
        return table.data.column(name).to_numpy() if name in table.column_names else None

    return TextStream(column("input_ids"), np.flatnonzero(column("doc_start")), column("bytes"), column("words"))
