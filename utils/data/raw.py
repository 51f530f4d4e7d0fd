"""Reading the text: a hub dataset or local files (txt, csv, json, jsonl), with a validation split.

Mistakes in the input (a missing, empty or unreadable file, an unknown file type, a column that
does not exist or holds no text) stop here with a ``UsageError`` naming the flag or the file.
"""

import logging
import os

import datasets
import xxhash
from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

from utils.errors import UsageError

logger = logging.getLogger(__name__)

# Plain text also under WikiText's own extensions (.raw, .tokens).
BUILDERS = {"txt": "text", "raw": "text", "tokens": "text", "csv": "csv", "json": "json", "jsonl": "json"}
# The text builder reads this much at a time (its default is 10 MiB). Pieces that large leave the
# heap fragmented, so a process's peak memory grew with the corpus (by 150 MB from WikiText-2 x1 to
# x10); at 1 MiB it stays flat, and loading is no slower. The rows are the same lines either way.
TEXT_CHUNK_BYTES = 1 << 20
HASH_CHUNK_BYTES = 8 << 20  # read size for the content digest of the input files


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
    extra = {"keep_linebreaks": data_args.keep_linebreaks, "chunksize": TEXT_CHUNK_BYTES} if builder == "text" else {}
    if not data_args.streaming:
        # datasets keys its copy of local files by path and mtime only: a same-size edit that kept the
        # mtime (cp -p, rsync -t, tar) would be served stale. The content digest is part of its config
        # id, hence of the rows' fingerprint and of our tokenized-cache key (utils/data/prepare.py).
        extra["description"] = "content " + content_digest([path for _, path in files.values()])
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


def content_digest(paths: list[str]) -> str:
    """A fast (xxh3-128) hash of the bytes of ``paths``, in order."""
    digest = xxhash.xxh3_128()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        digest.update(b"\0" + os.fsencode(path) + b"\0")
    return digest.hexdigest()


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
