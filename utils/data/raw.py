"""Reading the text: a hub dataset or local files (txt, csv, json, jsonl), with a validation split.

Mistakes in the input (a missing, empty or unreadable file, an unknown file type, a column that
does not exist or holds no text) stop here with a ``UsageError`` naming the flag or the file.
"""

import errno
import logging
import os

import datasets
from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

from utils.errors import UsageError
from utils.files import file_digest, new_digest

logger = logging.getLogger(__name__)

# The WikiText splits bundled in data/ (data/README.md), by config, under the hub dataset's names.
BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")
WIKITEXT_NAMES = ("wikitext", "Salesforce/wikitext")
WIKITEXT_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
# Plain text also under WikiText's own extensions (.raw, .tokens).
BUILDERS = {"txt": "text", "raw": "text", "tokens": "text", "csv": "csv", "json": "json", "jsonl": "json"}
# The text builder reads this much at a time (its default is 10 MiB). Pieces that large leave the
# heap fragmented, so a process's peak memory grew with the corpus (by 150 MB from WikiText-2 x1 to
# x10); at 1 MiB it stays flat, and loading is no slower. The rows are the same lines either way.
TEXT_CHUNK_BYTES = 1 << 20
READERS = os.sep + os.path.join("datasets", "packaged_modules") + os.sep  # where datasets' file readers live


def load_raw_datasets(model_args, data_args) -> DatasetDict | IterableDatasetDict:
    """The raw text splits ``train`` and ``validation`` from the hub or from local files."""
    if data_args.sample_by != "line" and data_args.dataset_name and not os.path.isdir(data_args.dataset_name):
        raise UsageError(f"--sample_by {data_args.sample_by} splits local text files; a hub dataset's rows are "
                         "its documents: drop the flag, or pass text files with --train_file")
    if data_args.dataset_name:
        raw = _load_hub_dataset(model_args, data_args)
        source = f"--dataset_name {data_args.dataset_name}"
    elif data_args.train_file or data_args.validation_file:
        raw = _load_files(model_args, data_args)
        source = " / ".join(f"--{flag} {path}" for flag, path in (("train_file", data_args.train_file),
                                                                   ("validation_file", data_args.validation_file)) if path)
    else:
        raise UsageError("no data: pass --dataset_name, or --train_file (and optionally --validation_file)")
    if data_args.streaming:
        _read_first_rows(raw, source)
    if "validation" not in raw and "train" in raw:
        raw = _hold_out_validation(raw, data_args.validation_split_percentage)
    return raw


def _load_hub_dataset(model_args, data_args):
    if os.path.isdir(data_args.dataset_name):
        return _load_folder(model_args, data_args)
    try:
        return load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            streaming=data_args.streaming,
        )
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        _check_cache_written(err, model_args.cache_dir)
        # Neither the hub nor the datasets cache has it: the copy bundled in data/, if there is one.
        if data_args.dataset_name in WIKITEXT_NAMES:
            return _load_bundled_wikitext(model_args, data_args, err)
        offline = " (HF_HUB_OFFLINE is set: use local files with --train_file)" if datasets.config.HF_HUB_OFFLINE else ""
        raise UsageError(f"--dataset_name {data_args.dataset_name}: cannot load it{offline}: {_first_line(err)}") from None
    except OSError as err:  # a read-only cache, say
        _check_cache_written(err, model_args.cache_dir)
        raise


def _load_bundled_wikitext(model_args, data_args, err):
    config = data_args.dataset_config_name
    folder = os.path.join(BUNDLED_DATA, config or "")
    files = {split: os.path.join(folder, name) for split, name in WIKITEXT_FILES.items()}
    if config and all(os.path.isfile(path) for path in files.values()):
        logger.warning("--dataset_name %s --dataset_config_name %s: the hub copy cannot be loaded (%s); using the "
                       "bundled files %s", data_args.dataset_name, config, _first_line(err),
                       ", ".join(f"{split}={path}" for split, path in files.items()))
        return _read_files({split: ("--dataset_name", path) for split, path in files.items()}, model_args, data_args)
    complete = sorted(name for name in os.listdir(BUNDLED_DATA)
                      if all(os.path.isfile(os.path.join(BUNDLED_DATA, name, f)) for f in WIKITEXT_FILES.values()))
    have = f"only {', '.join(sorted(os.listdir(folder)))} of it is bundled in {folder}" if config and \
        os.path.isdir(folder) else "it is not bundled"
    alternative = " or ".join(f"--dataset_config_name {name}" for name in complete)
    raise UsageError(f"--dataset_name {data_args.dataset_name} --dataset_config_name {config}: cannot load it from "
                     f"the hub ({_first_line(err)}) and {have}; train on the bundled copy with {alternative}, or "
                     "pass your own files with --train_file") from None


def _load_folder(model_args, data_args):
    """A local folder of text, csv or json files; the split of each is in its name (train, valid, test)."""
    folder = data_args.dataset_name
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        split = _split_of(name)
        if split and os.path.isfile(path) and name.rpartition(".")[2].lower() in BUILDERS:
            files.setdefault(split, []).append(path)
    if "train" not in files and "validation" not in files:
        raise UsageError(f"--dataset_name {folder}: a local folder needs files whose names say their split "
                         "(e.g. train.txt, valid.txt; or wiki.train.tokens), of type .txt/.raw/.tokens, .csv or "
                         ".json/.jsonl")
    logger.info("--dataset_name %s: reading %s", folder,
                "; ".join(f"{split}: {', '.join(paths)}" for split, paths in files.items()))
    return _read_files({split: ("--dataset_name", paths) for split, paths in files.items()}, model_args, data_args)


def _split_of(file_name: str) -> str | None:
    stem = file_name.lower()
    for split, words in (("train", ("train",)), ("validation", ("valid", "dev")), ("test", ("test",))):
        if any(word in stem for word in words):
            return split
    return None


def _load_files(model_args, data_args):
    files = {}
    if data_args.train_file:
        files["train"] = ("--train_file", data_args.train_file)
    if data_args.validation_file:
        files["validation"] = ("--validation_file", data_args.validation_file)
    return _read_files(files, model_args, data_args)


def _read_files(files: dict, model_args, data_args):
    """``{split: (flag, path or paths)}`` read by the one builder their type calls for."""
    kinds = {(split, path): _check_text_file(flag, path) for split, (flag, paths) in files.items()
             for path in ([paths] if isinstance(paths, str) else paths)}
    if len(set(kinds.values())) > 1:
        raise UsageError(
            " and ".join(f"{files[split][0]} {path}" for split, path in kinds) +
            " must be of the same type (all text, all .csv or all .json/.jsonl)"
        )
    builder = next(iter(kinds.values()))
    extra = {"keep_linebreaks": data_args.keep_linebreaks, "chunksize": TEXT_CHUNK_BYTES} if builder == "text" else {}
    if data_args.sample_by != "line":  # given only then: the default's rows keep their fingerprint, hence their cache
        if builder != "text":
            raise UsageError(f"--sample_by {data_args.sample_by} splits text files; in {builder} data each row is "
                             "a document: drop the flag")
        extra["sample_by"] = data_args.sample_by
    if not data_args.streaming:
        # datasets keys its copy of local files by path and mtime only: a same-size edit that kept the
        # mtime (cp -p, rsync -t, tar) would be served stale. The content digest is part of its config
        # id, hence of the rows' fingerprint and of our tokenized-cache key (utils/data/prepare.py).
        extra["description"] = "content " + content_digest([path for _, path in kinds])
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
        _check_cache_written(err, model_args.cache_dir)
        names = " / ".join(f"{files[split][0]} {path}" for split, path in kinds)
        cause = _root_cause(err)  # datasets wraps the reader's error in one that says only that it failed
        hint = "; is it text? save it as UTF-8 (from cp1252: iconv -f cp1252 -t utf-8)" \
            if isinstance(cause, UnicodeDecodeError) else ""
        raise UsageError(f"{names}: cannot be read as {builder}: {_first_line(cause)}{hint}") from None


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _check_cache_written(err: BaseException, cache_dir: str | None) -> None:
    """A datasets cache that cannot be written is the cache's fault, not the data's: say which folder."""
    cache = os.path.abspath(cache_dir or datasets.config.HF_DATASETS_CACHE)
    while err is not None:
        filename = getattr(err, "filename", None)
        if isinstance(err, OSError) and err.errno in _NOT_WRITABLE and filename and \
                os.path.abspath(filename).startswith(cache):
            which = f"--cache_dir {cache_dir}" if cache_dir else f"the datasets cache {cache} (under HF_HOME)"
            raise UsageError(f"{which} cannot be written ({err.strerror}): pass --cache_dir with a writable folder, "
                             "or set HF_HOME to one") from None
        err = err.__cause__ or err.__context__


def _read_first_rows(streams, source: str) -> None:
    """The first row of each stream, so that a file broken at its start stops the run before it begins.

    Streams are otherwise read only by the training loop. The first row decodes the file's first
    chunk (1 MiB of text, a block of JSON lines); a file broken further on is found while training.
    """
    for split, rows in streams.items():
        try:
            next(iter(rows), None)
        except Exception as err:  # the builders raise many kinds of parse errors
            file = file_being_read(err)
            where = f"{source}: {file}" if file and file not in source else source
            raise UsageError(f"{where} cannot be read ({split} split, at its start): {_first_line(err)}; fix or "
                             "remove that file") from None


def file_being_read(err: BaseException) -> str | None:
    """The file a datasets reader was reading when it raised ``err``, from the reader's frame."""
    file = None
    frames = err.__traceback__
    while frames is not None:
        if READERS in frames.tb_frame.f_code.co_filename:
            file = frames.tb_frame.f_locals.get("file", file)
        frames = frames.tb_next
    return file


def content_digest(paths: list[str]) -> str:
    """A fast hash (utils/files.py new_digest) of the bytes of ``paths``, in order."""
    digest = new_digest()
    for path in paths:
        digest.update(f"{file_digest(path)[0]}\0{path}\0".encode())
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


def require_rows_with_text(rows, column: str, split: str, data_args) -> None:
    """Every row holds text: a null (a JSON row with "text": null, say) would fail deep inside the tokenizer."""
    missing = rows.data.column(column).null_count  # the table behind the rows: counted, not read
    if missing:
        raise UsageError(f"{split_source(data_args, split)}: {missing} row(s) of the {split} split have no text (null "
                         f"in the '{column}' column); give each row text (an empty string is fine) or leave those "
                         "rows out")


def split_source(data_args, split: str) -> str:
    """The flag and file (or dataset) a split's rows come from."""
    if data_args.dataset_name:
        return f"--dataset_name {data_args.dataset_name}"
    if split == "validation" and data_args.validation_file:
        return f"--validation_file {data_args.validation_file}"
    return f"--train_file {data_args.train_file}"


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
