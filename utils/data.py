"""Text in, training samples out: load, tokenize, cut into sequences, cache on disk.

Samples are token-id sequences stored as int32. Grouped text is packed into blocks of
``seq_len`` tokens as one continuous stream (only the final partial block is dropped),
with NumPy instead of Python list concatenation. Labels, attention masks and special-token
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
import shutil
import socket
import tempfile
from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (makes pa.compute available)
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

from .errors import UsageError
from .fast_tokenize import exact_encoder

logger = logging.getLogger(__name__)

# Bump when the stored layout of a prepared split changes, so old cache entries are not reused.
CACHE_FORMAT = 1
# Plain text also under WikiText's own extensions (.raw, .tokens).
BUILDERS = {"txt": "text", "raw": "text", "tokens": "text", "csv": "csv", "json": "json", "jsonl": "json"}
PACK_ROWS = 10_000  # rows of token lists packed at a time when preparing a split
SAMPLE_ROWS = 1000  # rows, spread over the split, on which a faster tokenizer path must give the same ids
STREAM_GROUP_ROWS = 1000  # rows packed together when grouping a stream on the fly
# A stream may never end: without --max_eval_samples, evaluation stops after this many samples.
STREAM_EVAL_SAMPLES = 1000


# ---------------------------------------------------------------------------- loading


def load_raw_datasets(model_args, data_args) -> DatasetDict | IterableDatasetDict:
    """The raw text splits ``train`` and ``validation`` from the hub or from local files."""
    if data_args.dataset_name:
        raw = _load_hub_dataset(model_args, data_args)
    elif data_args.train_file or data_args.validation_file:
        raw = _load_files(model_args, data_args)
    else:
        raise UsageError("no data: pass --dataset_name, or --train_file (and optionally --validation_file)")
    if "validation" not in raw and "train" in raw:
        raw = _hold_out_validation(raw, data_args.validation_split_percentage)
    return raw


def _load_hub_dataset(model_args, data_args):
    try:
        return load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            streaming=data_args.streaming,
        )
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (HF_HUB_OFFLINE is set: use local files with --train_file)" if datasets.config.HF_HUB_OFFLINE else ""
        raise UsageError(f"--dataset_name {data_args.dataset_name}: cannot load it{offline}: {_first_line(err)}") from None


def _load_files(model_args, data_args):
    files = {}
    if data_args.train_file:
        files["train"] = ("--train_file", data_args.train_file)
    if data_args.validation_file:
        files["validation"] = ("--validation_file", data_args.validation_file)
    kinds = {split: _check_text_file(flag, path) for split, (flag, path) in files.items()}
    if len(set(kinds.values())) > 1:
        raise UsageError(
            f"--train_file {data_args.train_file} and --validation_file {data_args.validation_file} "
            "must be of the same type (both text, both .csv or both .json/.jsonl)"
        )
    builder = next(iter(kinds.values()))
    extra = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
    try:
        return load_dataset(
            builder,
            data_files={split: path for split, (_, path) in files.items()},
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            streaming=data_args.streaming,
            **extra,
        )
    except Exception as err:  # the builders raise many kinds of parse errors
        names = " / ".join(f"{flag} {path}" for flag, path in files.values())
        raise UsageError(f"{names}: cannot be read as {builder}: {_first_line(err)}") from None


def _check_text_file(flag: str, path: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    extension = os.path.basename(path).rpartition(".")[2].lower() if "." in os.path.basename(path) else ""
    if extension not in BUILDERS:
        raise UsageError(f"{flag} {path}: unsupported file type '.{extension}'; use .txt (or .raw/.tokens), .csv, .json or .jsonl")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot be read: {err.strerror}") from None
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path} is empty")
    return BUILDERS[extension]


def _hold_out_validation(raw, percentage: int):
    """Carve a validation split out of train, as the Hugging Face examples do."""
    if not 0 < percentage < 100:
        raise UsageError(f"--validation_split_percentage {percentage}: give a number from 1 to 99")
    train = raw["train"]
    if isinstance(train, IterableDataset):
        # A stream has no known length: hold out `percentage` rows of every hundred.
        keep = lambda _, index: index % 100 >= percentage  # noqa: E731
        held = lambda _, index: index % 100 < percentage  # noqa: E731
        return IterableDatasetDict(
            train=train.filter(keep, with_indices=True), validation=train.filter(held, with_indices=True)
        )
    if len(train) < 2:
        # Nothing to hold out without leaving nothing to train on: no validation split, so that
        # --do_eval asks for --validation_file (prepare_datasets) while training alone still works.
        logger.warning("The training data has %d row(s) of text, too few to hold some out for evaluation; "
                       "pass --validation_file to evaluate", len(train))
        return raw
    n_validation = min(max(1, round(len(train) * percentage / 100)), len(train) - 1)
    return DatasetDict(
        train=train.select(range(n_validation, len(train))), validation=train.select(range(n_validation))
    )


def text_column(dataset, requested: str | None) -> str:
    """The column holding the text: --text_column_name, else 'text', else the first column."""
    columns = list(dataset.column_names or [])
    if requested:
        if requested not in columns:
            raise UsageError(f"--text_column_name {requested}: no such column; the data has {', '.join(columns)}")
        return requested
    if not columns:
        raise UsageError("the data has no columns: pass --text_column_name")
    column = "text" if "text" in columns else columns[0]
    _require_text(dataset, column, requested)
    return column


def _require_text(dataset, column: str, requested: str | None) -> None:
    """A column of numbers (or lists, ...) would fail deep inside the tokenizer."""
    feature = (dataset.features or {}).get(column)
    if feature is None or getattr(feature, "dtype", None) in ("string", "large_string"):
        return
    kind = getattr(feature, "dtype", None) or type(feature).__name__
    others = [name for name, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    hint = f"pass --text_column_name with one that holds text ({', '.join(others)})" if others else \
        "no column holds text: check --train_file / --validation_file"
    how = f"--text_column_name {column}" if requested else f"the text column ('{column}', taken by default)"
    raise UsageError(f"{how} holds {kind} values, not text; {hint}")


# ----------------------------------------------------------------------- preparation


def prepare_datasets(raw, tokenizer, data_args, training_args, *, seq_len: int, line_by_line: bool = False,
                     pad_to_max_length: bool = False, cache_dir: str | None = None) -> dict:
    """Tokenized samples for the splits the run needs: ``{"train": ..., "eval": ...}``."""
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
        )
        if isinstance(rows, IterableDataset):
            if max_samples is None and name == "eval":
                max_samples = STREAM_EVAL_SAMPLES
                logger.info("Streaming: evaluating on the first %d samples (set --max_eval_samples to change it)",
                            max_samples)
            samples = recipe.stream(rows)
            if max_samples is not None:
                samples = samples.take(max_samples)
        else:
            # For local files datasets' fingerprint follows the file's mtime, so edited text is a new key.
            source = rows._fingerprint
            with training_args.main_process_first(desc=f"preparing the {split} split"):
                samples = _cached(recipe, rows, source, max_samples, data_args.overwrite_cache, cache_dir)
            if len(samples) == 0:
                raise UsageError(
                    f"the {split} data gives no samples: is it empty, or shorter than one block of {seq_len} tokens?"
                )
        result[name] = samples
    return result


class SampleRecipe:
    """How raw text rows become samples: tokenize, then pack into blocks or keep one line per sample."""

    def __init__(self, tokenizer, column: str, seq_len: int, line_by_line: bool, pad_to_max_length: bool,
                 num_proc: int | None):
        self.tokenizer = tokenizer
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
            "tokenizer": _tokenizer_digest(self.tokenizer),
            "column": self.column,
            "seq_len": self.seq_len,
            "line_by_line": self.line_by_line,
            "pad_to_max_length": self.pad_to_max_length,
            "max_samples": max_samples,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def tokenize(self, batch: dict) -> dict:
        texts = batch[self.column]
        if self.line_by_line:
            texts = [text for text in texts if text and not text.isspace()]
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
            # Long rows are fine here: they are cut into blocks afterwards.
            encoded = self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)
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
            if self.line_by_line:
                samples = self._tokenize_rows(prefix, workdir)
            else:
                samples = self._pack(self._token_pieces(prefix, encode), os.path.join(workdir, f"blocks-{count}.arrow"))
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
        """texts -> their ids one after the other: tiktoken where it is exact on this text, else the tokenizer."""
        n_rows = len(rows)
        spread = np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).astype(np.int64)) if n_rows else []
        encoder = exact_encoder(self.tokenizer, list(rows.select(spread)[self.column]))
        if encoder is not None:
            return lambda texts: encoder.encode(texts)[0]
        return self._tokenizer_ids

    def _tokenizer_ids(self, texts: list[str]) -> np.ndarray:
        lists = self.tokenize({self.column: texts})["input_ids"]
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32)

    def _token_pieces(self, rows: Dataset, encode) -> Iterator[np.ndarray]:
        """The ids of PACK_ROWS rows at a time, in order; tokenized in ``num_proc`` processes if asked."""
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
        """The text, a piece at a time; from the split's Arrow files by plain reads when it is all of them.

        Pages of a memory-mapped file count in the process's resident memory, which would then grow
        with the corpus; read pieces are freed as the next one comes.
        """
        files = [entry["filename"] for entry in rows.cache_files]
        if rows._indices is not None or not files:
            for start, stop in bounds:
                yield rows[start:stop][self.column]
            return
        for path in files:
            with pa.OSFile(path) as source, pa.ipc.open_stream(source) as reader:
                for batch in reader:
                    column = batch.column(batch.schema.get_field_index(self.column))
                    for start in range(0, len(column), PACK_ROWS):
                        yield column.slice(start, PACK_ROWS).to_pylist()

    def _pack(self, pieces: Iterator[np.ndarray], path: str) -> Dataset:
        """Blocks written to an Arrow file piece by piece, so memory does not grow with the corpus.

        The stream stays continuous: the tokens left over after one piece start the next one.
        """
        os.makedirs(os.path.dirname(path), exist_ok=True)
        schema = pa.schema({"input_ids": pa.list_(pa.int32(), self.seq_len)})
        carry = np.empty(0, np.int32)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for ids in pieces:
                flat = np.concatenate([carry, ids.astype(np.int32, copy=False)])
                blocks = pack_blocks(flat, self.seq_len)
                carry = flat[blocks.size:]
                if len(blocks):
                    array = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), self.seq_len)
                    writer.write_batch(pa.record_batch([array], schema=schema))
        return Dataset.from_file(path)

    def stream(self, rows: IterableDataset) -> IterableDataset:
        """The same samples, produced on the fly from a stream."""
        tokens = rows.map(self.tokenize, batched=True, remove_columns=rows.column_names)
        if self.line_by_line:
            return tokens
        return tokens.map(self._pack_batch, batched=True, batch_size=STREAM_GROUP_ROWS)

    def _pack_batch(self, batch: dict) -> dict:
        lists = batch["input_ids"]
        flat = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in lists]) if lists else np.empty(0, np.int32)
        return {"input_ids": list(pack_blocks(flat, self.seq_len))}


def pack_blocks(flat: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut one stream of token ids into rows of ``seq_len``, dropping the incomplete tail."""
    n_blocks = len(flat) // seq_len
    return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)


_WORKER_TASK = None  # (rows, column, encode) of the split being tokenized by forked workers


def _encode_range(bounds: tuple[int, int]) -> np.ndarray:
    rows, column, encode = _WORKER_TASK
    return encode(rows[bounds[0]:bounds[1]][column])


# ------------------------------------------------------------------------------ cache


def tokenized_cache_root(cache_dir: str | None) -> str:
    if cache_dir:
        return os.path.join(cache_dir, "tokenized")
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "tokenized")


def _cached(recipe: SampleRecipe, rows: Dataset, source: str, max_samples: int | None, overwrite: bool,
            cache_dir: str | None) -> Dataset:
    root = tokenized_cache_root(cache_dir)
    path = os.path.join(root, recipe.key(source, max_samples))
    if os.path.isdir(path) and not overwrite:
        logger.info("Reusing tokenized data from %s", path)
        return load_from_disk(path)
    logger.info("Tokenizing (from %d rows of text)%s; caching the result in %s", len(rows),
                " again (--overwrite_cache)" if overwrite else "", path)
    os.makedirs(root, exist_ok=True)
    _remove_dead_builds(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{BUILD_PREFIX}{os.getpid()}@{socket.gethostname()}-") as workdir:
        samples = recipe.build(rows, max_samples, workdir)
        if len(samples) == 0:
            return samples  # nothing worth caching; the caller reports it
        staging = os.path.join(workdir, "samples")
        samples.save_to_disk(staging)
        # Publish atomically: a run killed mid-save leaves no half-written entry behind.
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    return load_from_disk(path)


BUILD_PREFIX = ".build-"  # .build-PID@HOST-xxxx: the work folder of a process building a cache entry


def _remove_dead_builds(root: str) -> None:
    """Work folders left by a process of this machine that was killed while building (never a live one's)."""
    for name in os.listdir(root):
        # tempfile's random suffix has no "-"; a host name may.
        owner = name[len(BUILD_PREFIX):].rsplit("-", 1)[0] if name.startswith(BUILD_PREFIX) else ""
        pid, _, host = owner.partition("@")
        if pid.isdigit() and host == socket.gethostname() and not _alive(int(pid)):
            logger.info("Removing %s, left by a tokenization that was cut off", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens, tokenizer.padding_side])
    return hashlib.sha256((content + extra).encode()).hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]



def tokens_per_sample(samples, seq_len: int, line_by_line: bool) -> float | None:
    """Mean tokens in one sample (for tokens/s), without reading the samples one by one."""
    if not line_by_line:
        return float(seq_len)
    if not isinstance(samples, Dataset) or len(samples) == 0:
        return None
    lengths = pa.compute.list_value_length(samples.data.column("input_ids"))
    return float(pa.compute.mean(lengths).as_py())


def num_samples(samples) -> int | None:
    return len(samples) if isinstance(samples, Dataset) else None
