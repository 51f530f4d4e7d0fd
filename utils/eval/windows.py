"""Windows over a token stream for evaluation: what the model reads, and which of those tokens it is scored on.

A window is a row ``(start, end, first)``: the model reads tokens ``[start, end)`` of the stream
and is scored on ``[first, end)``, each of those tokens predicted from all the window's tokens
before it (``first > start``: a window's first token has nothing to be predicted from).

``blocks``: the stream cut into blocks of ``block`` tokens, the last partial one dropped, each
scored on all but its first token: what the grouped samples give (utils/data/prepare.py).

``sliding``: windows of ``block`` tokens starting every ``stride`` tokens of a document, each
scored only on the tokens the window before it did not score, until one reaches the document's
end (the Hugging Face perplexity guide's loop, with the scored tokens counted exactly). Every
token but a document's first is scored once, with at least ``block - stride`` tokens of context,
so ``stride < block``. Documents are ``(start, end)`` runs of the stream; the grouped text is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from utils.eval.text_units import TextStream, text_figures
from utils.model.metrics import IGNORE_INDEX

START, END, FIRST = range(3)  # the columns of a window row


def blocks(length: int, block: int) -> np.ndarray:
    """Disjoint blocks of ``block`` tokens over a stream of ``length`` tokens."""
    starts = np.arange(length // block, dtype=np.int64) * block
    return np.stack([starts, starts + block, starts + 1], axis=1)


def sliding(documents: Sequence[tuple[int, int]], block: int, stride: int) -> np.ndarray:
    """Sliding windows over each document ``(start, end)``, one after the other."""
    if not 0 < stride < block:
        raise ValueError(f"stride {stride} must lie between 0 and the block size {block}")
    rows = []
    for doc_start, doc_end in documents:
        length = doc_end - doc_start
        if length < 2:
            continue  # one token: nothing to predict it from
        count = 1 + -(-max(0, length - block) // stride)  # until a window reaches the end
        starts = doc_start + np.arange(count, dtype=np.int64) * stride
        ends = np.minimum(starts + block, doc_end)
        firsts = np.concatenate([[doc_start + 1], ends[:-1]])  # what the window before did not score
        rows.append(np.stack([starts, ends, firsts], axis=1))
    return np.concatenate(rows) if rows else np.empty((0, 3), np.int64)


class ScoredWindows(torch.utils.data.Dataset):
    """The evaluation samples of windows over a stream: ``input_ids`` and ``labels`` (IGNORE_INDEX
    where a token is not scored), all padded at the end to the longest window.

    Padding comes after a window's tokens, so under causal attention no scored token sees it.
    Knows what its windows score: tokens, and the bytes and words of text those tokens own.
    """

    def __init__(self, stream: TextStream, windows: np.ndarray):
        self.ids = stream.ids
        self.windows = windows
        self.length = int((windows[:, END] - windows[:, START]).max()) if len(windows) else 0
        scored = windows[:, END] - windows[:, FIRST]
        self.scored_tokens = int(scored.sum())
        # The Trainer's eval loss is a mean over samples: the mean over tokens only if each scores as many.
        self.uniform = len(np.unique(scored)) <= 1
        self.scored_bytes = _scored(stream.bytes, windows)
        self.scored_words = _scored(stream.words, windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        start, end, first = (int(v) for v in self.windows[index])
        input_ids = np.zeros(self.length, np.int64)
        input_ids[: end - start] = self.ids[start:end]
        labels = np.full(self.length, IGNORE_INDEX, np.int64)
        labels[first - start: end - start] = self.ids[first:end]
        return {"input_ids": input_ids, "labels": labels}

    def figures(self, mean_loss: float) -> dict:
        """The counts and the per-byte and per-word figures of the mean loss over the scored tokens."""
        if self.scored_bytes is None:
            return {"tokens": self.scored_tokens}
        loss_sum = mean_loss * self.scored_tokens
        return {"tokens": self.scored_tokens, "bytes": self.scored_bytes, "words": self.scored_words,
                **text_figures(loss_sum, self.scored_bytes, self.scored_words)}


def _scored(units: np.ndarray | None, windows: np.ndarray) -> int | None:
    """The sum of ``units`` over the scored tokens of all windows."""
    if units is None:
        return None
    before = np.concatenate([[0], np.cumsum(units, dtype=np.int64)])
    return int((before[windows[:, END]] - before[windows[:, FIRST]]).sum())
