"""How much text a token stream covers: the UTF-8 bytes and whitespace-separated words each token owns.

A loss summed over tokens, divided by the bytes or the words of the text those tokens cover,
compares across tokenizers. Which text a token covers is read from the tokenizer's character
offsets into the original text, not from decoding the ids: decoding does not give the text back
for every tokenizer (sentencepiece normalizes it and adds a leading space, an uncased WordPiece
lowercases it, unknown characters come back as <unk>). Every character of the text is owned by
exactly one token:

* a token owns the text from where the tokens before it end up to where it ends: the spaces
  between two tokens go with the token after them, as GPT-2's ``Ġword`` carries its space;
* a character split over several tokens (byte-level BPE cuts rare characters into bytes) belongs
  to the first of them;
* the special tokens the tokenizer adds (BOS, [CLS], XLNet's <sep> <cls>) own no text;
* text after the stream's last token (a final line break a tokenizer drops) belongs to that token.

So the bytes and words owned by all tokens add up to those of the whole text, and those of any
part of the stream are exact. A word counts where it starts: in the token owning its first
character. Words are what ``str.split()`` separates, within each text (row) of the stream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from utils.model.metrics import perplexity

WORD = re.compile(r"\S+")  # the same whitespace as str.split()
LN2 = math.log(2)


@dataclass
class TextStream:
    """Token ids one after the other, and per token the bytes and words of text it owns (None
    where the tokenizer gives no offsets); ``doc_starts``: the first token of each text (row)."""

    ids: np.ndarray
    doc_starts: np.ndarray
    bytes: np.ndarray | None = None
    words: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_units(self) -> bool:
        return self.bytes is not None


def read_stream(encode: Callable[[list[str]], dict], texts: Iterable[list[str]], need: int | None,
                offsets: bool) -> TextStream:
    """The stream of ``texts`` (lists of rows, in order) until it holds ``need`` tokens (None: all).

    ``encode``: rows -> the tokenizer's output, with ``offset_mapping`` and ``special_tokens_mask``
    when ``offsets``; without them the stream has no text units.
    """
    counter = UnitCounter() if offsets else None
    ids, lengths = [], []
    total = 0
    for rows in texts:
        encoded = encode(rows)
        row_ids = encoded["input_ids"]
        lengths += [len(r) for r in row_ids]
        ids.append(np.fromiter((i for r in row_ids for i in r), np.int32, count=sum(map(len, row_ids))))
        if counter is not None:
            counter.add(rows, encoded["offset_mapping"], encoded["special_tokens_mask"])
        total += len(ids[-1])
        if need is not None and total >= need:
            break
    flat = np.concatenate(ids) if ids else np.empty(0, np.int32)
    starts = np.cumsum([0, *lengths[:-1]], dtype=np.int64)[np.asarray(lengths, np.int64) > 0] if lengths else \
        np.empty(0, np.int64)
    stream = TextStream(flat, starts)
    if counter is not None:
        stream.bytes, stream.words = counter.finish()
    return stream


class UnitCounter:
    """The bytes and words each token owns, batch of rows by batch of rows (the rule in the module doc).

    Positions are byte offsets into the whole text read so far; ``reach`` is where the text owned
    by the tokens so far ends, and ``pending`` the word starts (byte offsets) from there on.
    """

    def __init__(self):
        self.base = 0  # bytes of the rows before this batch
        self.reach = 0
        self.pending = np.empty(0, np.int64)
        self.bytes: list[np.ndarray] = []
        self.words: list[np.ndarray] = []
        self.tokens = 0
        self.last_owner = -1  # the last token (in the stream) that is not a special token

    def add(self, rows: list[str], offsets: list, special: list) -> None:
        joined = "".join(rows)
        raw = np.frombuffer(joined.encode("utf-8", "surrogatepass"), np.uint8)
        # The byte offset of each character (and of the end): where a UTF-8 sequence starts.
        char_byte = np.append(np.flatnonzero((raw & 0xC0) != 0x80), raw.size).astype(np.int64) + self.base
        row_start = np.cumsum([0, *map(len, rows[:-1])], dtype=np.int64)
        word_chars = [start + m.start() for start, row in zip(row_start, rows) for m in WORD.finditer(row)]
        lengths = np.fromiter(map(len, offsets), np.int64, count=len(offsets))
        ends = np.fromiter((end for row in offsets for _, end in row), np.int64, count=int(lengths.sum()))
        own = np.fromiter((not s for row in special for s in row), bool, count=len(ends))
        ends = char_byte[np.repeat(row_start, lengths) + ends]
        ends[~own] = -1  # a special token moves nothing on
        reach = np.maximum.accumulate(np.concatenate([[self.reach], ends]))
        words = np.concatenate([self.pending, char_byte[np.asarray(word_chars, np.int64)]])
        owned_words = np.searchsorted(words, reach, side="left")
        self.bytes.append(np.diff(reach))
        self.words.append(np.diff(owned_words))
        self.reach, self.pending = int(reach[-1]), words[owned_words[-1]:]
        if own.any():
            self.last_owner = self.tokens + int(np.flatnonzero(own)[-1])
        self.tokens += len(ends)
        self.base += raw.size

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token: bytes and words owned; the text after the last token goes to it."""
        n_bytes = np.concatenate(self.bytes).astype(np.int64) if self.bytes else np.empty(0, np.int64)
        n_words = np.concatenate(self.words).astype(np.int64) if self.words else np.empty(0, np.int64)
        if self.last_owner >= 0:
            n_bytes[self.last_owner] += self.base - self.reach
            n_words[self.last_owner] += len(self.pending)
        return n_bytes, n_words


def text_figures(loss_sum: float, n_bytes: int, n_words: int) -> dict:
    """The summed loss (nats) per byte and per word: bits per byte, byte and word perplexity."""
    figures = {}
    if n_bytes > 0:
        figures["bits_per_byte"] = loss_sum / n_bytes / LN2
        figures["byte_perplexity"] = perplexity(loss_sum / n_bytes)
    if n_words > 0:
        figures["word_perplexity"] = perplexity(loss_sum / n_words)
    return figures

