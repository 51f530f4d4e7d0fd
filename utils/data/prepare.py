"""Text in, training samples out: tokenize, cut into sequences, cache on disk.

(Reading the text is ``utils/data/raw.py``; the cache itself ``utils/data/cache.py``.)

Samples are token-id sequences stored as int32. Grouped text is packed into blocks of
``seq_len`` tokens as one continuous stream (only the final partial block is dropped),
with NumPy instead of Python list concatenation; under ``--packing document`` each document
stays whole in one block instead (utils/data/packing.py). Labels, attention masks and special-token
masks are not stored: the collators derive them per batch, which keeps the cache small.

A prepared split is saved under the tokenized-data cache with a key made of everything that
determines its content (tokenizer, source data, sequence length, options), so the next run
with the same inputs memory-maps it instead of tokenizing again.
"""

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (makes pa.compute available)
from datasets import Dataset, IterableDataset

from utils.data.arrow_files import file_column, file_span, write_batches
from utils.data.cache import cached_samples, tokenizer_digest
from utils.errors import UsageError
from utils.data.fast_tokenize import exact_encoder
from utils.data.packing import DocumentPacker
from utils.data.raw import require_rows_with_text, text_column

logger = logging.getLogger(__name__)

# Bump when the stored layout of a prepared split changes, so old cache entries are not reused.
CACHE_FORMAT = 3  # 3: each entry holds its samples file's checksum (utils/data/cache.py)
PACK_ROWS = 10_000  # rows of token lists packed at a time when preparing a split
SAMPLE_ROWS = 1000  # rows, spread over the split, on which a faster tokenizer path must give the same ids
STREAM_GROUP_ROWS = 1000  # rows packed together when grouping a stream on the fly
# A stream may never end: without --max_eval_samples, evaluation stops after this many samples.
STREAM_EVAL_SAMPLES = 1000


def prepare_datasets(raw, tokenizer, data_args, training_args, *, seq_len: int, line_by_line: bool = False,
                     pad_to_max_length: bool = False, documents: DocumentPacker | None = None,
                     evaluation=None, cache_dir: str | None = None) -> dict:
    """Tokenized samples for the splits the run needs: ``{"train": ..., "eval": ...}``.

    ``documents``: --packing document's packer; None packs the stock way (one stream cut into blocks).
    ``evaluation``: what makes the evaluation samples instead of the recipe's blocks, by its
    ``samples(recipe, rows, max_samples, cached)`` (run_clm.py: utils/eval/causal.py).
    """
    if documents is not None and (line_by_line or pad_to_max_length):
        flag = "--line_by_line" if line_by_line else "--pad_to_max_length"
        raise UsageError(f"--packing document with {flag}: packing puts several whole documents in each "
                         f"sequence and pads per batch; use one of the two")
    wanted = {"train": (training_args.do_train, data_args.max_train_samples),
              "eval": (training_args.do_eval, data_args.max_eval_samples)}
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming reads data of unknown length: give the training length with --max_steps")
    result = {}
    for name, (needed, max_samples) in wanted.items():
        split = "train" if name == "train" else "validation"
        if not needed:
            continue
        if split not in raw:
            flag = "--train_file" if name == "train" else "--validation_file"
            few = " (the training data has too few rows to hold some out)" if "train" in raw else ""
            raise UsageError(f"--do_{name} needs a {split} split{few}: pass {flag} or a dataset that has one")
        rows = raw[split]
        if isinstance(rows, IterableDataset) and rows.column_names is None:
            # Streamed local files do not declare their columns: read the first rows to learn them.
            rows = rows._resolve_features()
        recipe = SampleRecipe(
            tokenizer=tokenizer,
            column=text_column(rows, data_args.text_column_name),
            seq_len=seq_len,
            line_by_line=line_by_line,
            pad_to_max_length=pad_to_max_length,
            num_proc=data_args.preprocessing_num_workers,
            documents=documents,
        )
        streamed = isinstance(rows, IterableDataset)
        if streamed and max_samples is None and name == "eval":
            max_samples = STREAM_EVAL_SAMPLES
            logger.info("Streaming: evaluating on the first %d samples (set --max_eval_samples to change it)",
                        max_samples)

        def cached(maker, max_samples: int | None) -> Dataset:
            """What the tokenized-data cache holds for ``rows`` as ``maker`` (the recipe, or the evaluation's) makes it."""
            require_rows_with_text(rows, recipe.column, split, data_args)
            # For local files the fingerprint follows the files' bytes (utils/data/raw.py), so edited text is a new key.
            with training_args.main_process_first(desc=f"preparing the {split} split"):
                return cached_samples(maker, rows, rows._fingerprint, max_samples, data_args.overwrite_cache,
                                      cache_dir)

        if name == "eval" and evaluation is not None:
            samples = evaluation.samples(recipe, rows, max_samples, cached)
        elif streamed:
            samples = recipe.stream(rows)
            if max_samples is not None:
                samples = samples.take(max_samples)
        else:
            samples = cached(recipe, max_samples)
        if not isinstance(samples, IterableDataset) and len(samples) == 0:
            raise UsageError(
                f"the {split} data gives no samples: is it empty, or shorter than one block of {seq_len} tokens?"
            )
        result[name] = samples
    return result


class SampleRecipe:
    """How raw text rows become samples: tokenize, then pack into blocks or keep one line per sample."""

    def __init__(self, tokenizer, column: str, seq_len: int, line_by_line: bool, pad_to_max_length: bool,
                 num_proc: int | None, documents: DocumentPacker | None = None):
        self.tokenizer = tokenizer
        self.documents = documents
        self.column = column
        self.seq_len = seq_len
        self.line_by_line = line_by_line
        self.pad_to_max_length = pad_to_max_length
        self.num_proc = num_proc

    def key(self, source_fingerprint: str, max_samples: int | None) -> str:
        """A digest of everything that decides the samples' content."""
        parts = {
            "format": CACHE_FORMAT,
            "source": source_fingerprint,
            "tokenizer": tokenizer_digest(self.tokenizer),
            "column": self.column,
            "seq_len": self.seq_len,
            "line_by_line": self.line_by_line,
            "pad_to_max_length": self.pad_to_max_length,
            "max_samples": max_samples,
        }
        if self.documents is not None:  # only then: the stock samples keep their cache entries
            parts["documents"] = self.documents.key()
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def tokenize(self, batch: dict, offsets: bool = False) -> dict:
        """The rows' token ids; with ``offsets`` (grouped text, fast tokenizers) also each token's character
        span in its row and which tokens the tokenizer added (utils/eval/text_units.py reads them)."""
        texts = batch[self.column]
        if self.line_by_line or self.documents is not None:
            texts = [text for text in texts if _has_text(text)]
        if self.line_by_line:
            encoded = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.seq_len,
                padding="max_length" if self.pad_to_max_length else False,
                return_attention_mask=self.pad_to_max_length,
                return_token_type_ids=False,
                verbose=False,
            )
        else:
            # Long rows are fine here: they are cut into blocks (or documents into pieces) afterwards.
            encoded = self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False,
                                     return_offsets_mapping=offsets, return_special_tokens_mask=offsets)
        return dict(encoded)

    def _features(self):
        ids = datasets.Sequence(datasets.Value("int32"))
        if self.line_by_line and self.pad_to_max_length:
            return datasets.Features(input_ids=ids, attention_mask=datasets.Sequence(datasets.Value("int8")))
        return datasets.Features(input_ids=ids)

    def build(self, rows: Dataset, max_samples: int | None, workdir: str) -> Dataset:
        """Samples from an in-memory or memory-mapped split, reading only the rows that are needed."""
        n_rows = len(rows)
        count = min(n_rows, 2000) if max_samples is not None else n_rows
        encode = None if self.line_by_line else self._ids_function(rows)
        while True:
            prefix = rows.select(range(count)) if count < n_rows else rows
            path = os.path.join(workdir, f"blocks-{count}.arrow")
            if self.line_by_line:
                samples = self._tokenize_rows(prefix, workdir)
            elif self.documents is not None:
                samples = self.documents.write(self._token_pieces(prefix, encode), path)
            else:
                samples = self._pack(self._token_pieces(prefix, encode), path)
            if max_samples is None or len(samples) >= max_samples or count == n_rows:
                break
            # Grow the prefix towards the size that should hold enough samples, at least doubling it.
            estimate = int(count * max_samples / max(len(samples), 1) * 1.1) + 1
            count = min(n_rows, max(2 * count, estimate))
        if max_samples is not None and len(samples) > max_samples:
            samples = samples.select(range(max_samples))
        return samples

    def _tokenize_rows(self, rows: Dataset, workdir: str) -> Dataset:
        return rows.map(
            self.tokenize,
            batched=True,
            num_proc=self.num_proc,
            remove_columns=rows.column_names,
            features=self._features(),
            cache_file_name=os.path.join(workdir, f"tokens-{len(rows)}.arrow"),
            load_from_cache_file=False,
            desc="Tokenizing",
        )

    def _ids_function(self, rows: Dataset):
        """texts -> (their ids one after the other, the number of each text's ids): tiktoken where it is exact
        on this text, else the tokenizer. Documents are the texts that hold some text."""
        n_rows = len(rows)
        spread = np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).astype(np.int64)) if n_rows else []
        encoder = exact_encoder(self.tokenizer, self._texts_at(rows, spread))
        if encoder is None:
            return self._tokenizer_ids  # tokenize() keeps the documents
        if self.documents is not None:
            return lambda texts: encoder.encode([text for text in texts if _has_text(text)])
        return encoder.encode

    def _texts_at(self, rows: Dataset, indices: np.ndarray) -> list[str]:
        """The texts of rows ``indices`` (ascending), by plain reads where ``_text_pieces`` reads so."""
        span = file_span(rows)
        if span is None:
            return list(rows.select(indices)[self.column])
        texts, offset = [], 0
        for column in file_column(span, self.column):
            if len(indices) and offset > indices[-1]:
                break  # past the last row asked for
            local = indices[(indices >= offset) & (indices < offset + len(column))] - offset
            texts += column.take(pa.array(local)).to_pylist()
            offset += len(column)
        return texts

    def _tokenizer_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        lists = self.tokenize({self.column: texts})["input_ids"]
        lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32, count=int(lengths.sum())), lengths

    def _token_pieces(self, rows: Dataset, encode) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The ids of PACK_ROWS rows at a time, in order, with each row's count; tokenized in ``num_proc``
        processes if asked."""
        bounds = [(start, min(start + PACK_ROWS, len(rows))) for start in range(0, len(rows), PACK_ROWS)]
        if not self.num_proc or self.num_proc < 2 or len(bounds) < 2:
            for texts in self._text_pieces(rows, bounds):
                yield encode(texts)
            return
        global _WORKER_TASK
        _WORKER_TASK = (rows, self.column, encode)  # forked workers inherit it: the text is not sent
        try:
            with multiprocessing.get_context("fork").Pool(self.num_proc) as pool:
                yield from pool.imap(_encode_range, bounds)
        finally:
            _WORKER_TASK = None

    def _text_pieces(self, rows: Dataset, bounds: list[tuple[int, int]]) -> Iterator[list[str]]:
        """The text, a piece at a time; by plain reads of the split's Arrow file when it is a run of its rows
        (``utils/data/arrow_files.py``), so that memory does not grow with the corpus."""
        span = file_span(rows)
        if span is None:
            for start, stop in bounds:
                yield rows[start:stop][self.column]
            return
        for column in file_column(span, self.column):
            for start in range(0, len(column), PACK_ROWS):
                yield column.slice(start, PACK_ROWS).to_pylist()

    def _pack(self, pieces: Iterator[tuple[np.ndarray, np.ndarray]], path: str) -> Dataset:
        """Blocks written to an Arrow file piece by piece, so memory does not grow with the corpus.

        The stream stays continuous: the tokens left over after one piece start the next one.
        """
        os.makedirs(os.path.dirname(path), exist_ok=True)
        schema = pa.schema({"input_ids": pa.list_(pa.int32(), self.seq_len)})

        def batches() -> Iterator[pa.RecordBatch]:
            carry = np.empty(0, np.int32)
            for ids, _ in pieces:
                flat = np.concatenate([carry, ids.astype(np.int32, copy=False)])
                blocks = pack_blocks(flat, self.seq_len)
                carry = flat[blocks.size:]
                if len(blocks):
                    array = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), self.seq_len)
                    yield pa.record_batch([array], schema=schema)

        write_batches(path, schema, batches())
        return Dataset.from_file(path)

    def stream(self, rows: IterableDataset) -> IterableDataset:
        """The same samples, produced on the fly from a stream."""
        tokens = rows.map(self.tokenize, batched=True, remove_columns=rows.column_names)
        if self.line_by_line:
            return tokens
        pack = self._pack_batch if self.documents is None else self.documents.pack_rows
        return tokens.map(pack, batched=True, batch_size=STREAM_GROUP_ROWS)

    def _pack_batch(self, batch: dict) -> dict:
        lists = batch["input_ids"]
        flat = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in lists]) if lists else np.empty(0, np.int32)
        return {"input_ids": list(pack_blocks(flat, self.seq_len))}


def _has_text(text: str | None) -> bool:
    """A row that is a line (--line_by_line) or a document (--packing document): not empty, not only spaces."""
    return bool(text) and not text.isspace()


def pack_blocks(flat: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut one stream of token ids into rows of ``seq_len``, dropping the incomplete tail."""
    n_blocks = len(flat) // seq_len
    return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)


_WORKER_TASK = None  # (rows, column, encode) of the split being tokenized by forked workers


def _encode_range(bounds: tuple[int, int]) -> np.ndarray:
    rows, column, encode = _WORKER_TASK
    return encode(rows[bounds[0]:bounds[1]][column])


def tokens_per_sample(samples, seq_len: int, varying: bool) -> float | None:
    """Mean tokens in one sample (for tokens/s; padding not counted), without reading the samples one by one.

    ``varying``: samples of their own lengths (--line_by_line, --packing document), else all ``seq_len``.
    """
    if not varying:
        return float(seq_len)
    if not isinstance(samples, Dataset) or len(samples) == 0:
        return None
    lengths = pa.compute.list_value_length(samples.data.column("input_ids"))
    return float(pa.compute.mean(lengths).as_py())


def num_samples(samples) -> int | None:
    """How many samples a split holds; None for a stream, whose length is not known."""
    return None if isinstance(samples, IterableDataset) else len(samples)
