"""A faster exact encoder for byte-level BPE tokenizers (GPT-2, RoBERTa, ...), through tiktoken.

tiktoken runs the same byte-level BPE as the tokenizers library at two to four times its speed,
given the same vocabulary and merges. It is only used where it gives the tokenizer call's ids:

- the tokenizer must be a plain byte-level BPE (no normalizer, no dropout, no prefix space), so
  that the vocabulary and merges say everything;
- added tokens in the text (RoBERTa's ``<unk>``, GPT-2's ``<|endoftext|>``) are cut out and given
  their own ids, as the tokenizer does; a row holding an added token with special matching rules
  (``lstrip``, ``rstrip``, ``single_word``, normalized) goes to the tokenizer call instead;
- the special tokens the tokenizer wraps every text in (RoBERTa's ``<s>`` ... ``</s>``) are added;
- before it is trusted, its ids are compared with the tokenizer call's on a sample of the text
  that is about to be tokenized. Any difference, or any of the above not holding, means the
  tokenizers library does the work, and the log says which path ran and why.
"""

from __future__ import annotations

import itertools
import json
import logging
import re

import numpy as np

logger = logging.getLogger(__name__)

# GPT-2's pre-tokenization, the one the tokenizers library's ByteLevel(use_regex=True) applies.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Unsupported(Exception):
    """The tokenizer is not one whose ids tiktoken reproduces."""


def byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class ByteLevelEncoder:
    """Token ids of texts, equal to ``tokenizer(texts)["input_ids"]``, as one flat int32 array.

    Rows are encoded to tiktoken's codes (its ranks, then one code per added token); a single
    NumPy lookup turns the codes of a whole batch into vocabulary ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        _check_pipeline(spec)
        self.encoding, id_of_rank = _build_encoding(spec["model"])
        id_of_code = list(id_of_rank)
        self.code_of_id = {index: code for code, index in enumerate(id_of_code)}
        for token in spec.get("added_tokens") or []:
            if token["id"] not in self.code_of_id:
                self.code_of_id[token["id"]] = len(id_of_code)
                id_of_code.append(token["id"])
        self.id_of_code = np.asarray(id_of_code, np.int32)
        prefix, suffix = wrapping_ids(tokenizer)
        self.prefix, self.suffix = self._codes(prefix), self._codes(suffix)
        self.added_codes, special_rules = {}, []
        for token in spec.get("added_tokens") or []:
            if token["lstrip"] or token["rstrip"] or token["single_word"] or token["normalized"]:
                special_rules.append(token["content"])
            else:
                self.added_codes[token["content"]] = self.code_of_id[token["id"]]
        # Longest first, as the tokenizer matches added tokens.
        names = sorted(self.added_codes, key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, names))) if names else None
        self.special_rules = tuple(special_rules)

    def _codes(self, ids: list[int]) -> list[int]:
        try:
            return [self.code_of_id[index] for index in ids]
        except KeyError:
            raise Unsupported("the tokenizer gives ids outside its vocabulary") from None

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids one after the other, and the number of ids of each text."""
        rows = [None if self._needs_tokenizer(text) else self._encode_row(text) for text in texts]
        by_tokenizer = [index for index, row in enumerate(rows) if row is None]
        if by_tokenizer:
            called = self.tokenizer([texts[i] for i in by_tokenizer], return_attention_mask=False,
                                    return_token_type_ids=False, verbose=False)["input_ids"]
            for index, ids in zip(by_tokenizer, called):
                rows[index] = self._codes(ids)
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
        codes = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=int(lengths.sum()))
        return self.id_of_code[codes], lengths

    def _needs_tokenizer(self, text: str) -> bool:
        return bool(self.special_rules) and any(token in text for token in self.special_rules)

    def _encode_row(self, text: str) -> list[int]:
        if self.added is None or not self.added.search(text):
            return [*self.prefix, *self.encoding.encode_ordinary(text), *self.suffix]
        codes, start = list(self.prefix), 0
        for match in self.added.finditer(text):  # added tokens cut the text; each piece is encoded alone
            codes += self.encoding.encode_ordinary(text[start:match.start()])
            codes.append(self.added_codes[match.group()])
            start = match.end()
        codes += self.encoding.encode_ordinary(text[start:])
        return codes + self.suffix


def _check_pipeline(spec: dict) -> None:
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"a {model.get('type')} model, not byte-level BPE")
    if spec.get("normalizer") is not None:
        raise Unsupported("the tokenizer normalizes the text first")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise Unsupported("its pre-tokenizer is not GPT-2's byte-level split")
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise Unsupported("BPE dropout, byte fallback or subword affixes")


def _build_encoding(model: dict):
    """tiktoken ranks are merge priorities (bytes first); id_of_rank maps them to the vocabulary's ids."""
    import tiktoken

    alphabet = byte_level_alphabet()

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(alphabet[char] for char in token)
        except KeyError:
            raise Unsupported(f"vocabulary entry {token!r} is not byte-level") from None

    ranks = {bytes([byte]): byte for byte in range(256)}
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merged = to_bytes(left) + to_bytes(right)
        if merged in ranks:
            raise Unsupported("two merges make the same token")
        ranks[merged] = len(ranks)
    ids = {to_bytes(token): index for token, index in model["vocab"].items()}
    missing = [token for token in ranks if token not in ids]
    if missing:
        raise Unsupported(f"{len(missing)} merged tokens are not in the vocabulary")
    id_of_rank = np.empty(len(ranks), np.int64)
    for token, rank in ranks.items():
        id_of_rank[rank] = ids[token]
    encoding = tiktoken.Encoding("byte-level-bpe", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})
    return encoding, id_of_rank


def wrapping_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after every text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start:start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain):]
    raise Unsupported("cannot tell which special tokens it adds")


def exact_encoder(tokenizer, sample: list[str]) -> ByteLevelEncoder | None:
    """The tiktoken encoder when it gives the tokenizer call's ids on ``sample``, else None (logged)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        logger.info("Tokenizing with the tokenizers library (install tiktoken for a faster exact path)")
        return None
    try:
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise Unsupported("not a fast tokenizer")
        encoder = ByteLevelEncoder(tokenizer)
    except Unsupported as reason:
        logger.info("Tokenizing with the tokenizers library: tiktoken cannot reproduce this tokenizer (%s)", reason)
        return None
    expected = tokenizer(sample, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    flat, _ = encoder.encode(sample)
    reference = np.fromiter(itertools.chain.from_iterable(expected), np.int64)
    if not np.array_equal(flat, reference):
        logger.warning("Tokenizing with the tokenizers library: tiktoken's ids differ from the tokenizer's on this text")
        return None
    logger.info("Tokenizing with tiktoken (byte-level BPE; same ids as the tokenizer on a sample of %d rows)",
                len(sample))
    return encoder
