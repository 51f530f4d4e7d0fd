"""The tokenized-data cache: a prepared split stored under a key of everything that made it.

An entry is built in a work folder of its own (``.build-PID@HOST-...``) and renamed into place
when complete, so a run killed while tokenizing leaves no half-written entry; work folders of
processes of this machine that are gone are removed by the next build.

Entries are trusted by their content, as checkpoints are: the samples file's checksum (xxh3-128,
utils/files.py), taken as the file is written, is stored beside it and checked at every reuse
(a read of the file: benchmarks/bench_integrity.py measures it). An entry whose file no longer
matches (rot, a bad copy, an edit), or that cannot be read, is built again with a warning.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile

import datasets
import pyarrow as pa
from datasets import Dataset

from utils.data.arrow_files import whole_file, write_rows, written_digest
from utils.errors import UsageError
from utils.files import file_digest, read_json, write_json

logger = logging.getLogger(__name__)


def tokenized_cache_root(cache_dir: str | None) -> str:
    if cache_dir:
        return os.path.join(cache_dir, "tokenized")
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "tokenized")


def cached_samples(recipe, rows: Dataset, source: str, max_samples: int | None, overwrite: bool,
                   cache_dir: str | None) -> Dataset:
    """The samples ``recipe`` makes of ``rows``: read from the cache, or built and stored there."""
    root = tokenized_cache_root(cache_dir)
    path = os.path.join(root, recipe.key(source, max_samples))
    replaces = os.path.isdir(path)  # a damaged entry, or --overwrite_cache
    if replaces and not overwrite:
        cached = _read_entry(path)
        if cached is not None:
            return cached
        why = " again (the cached entry is damaged)"
    else:
        why = " again (--overwrite_cache)" if overwrite else ""
    logger.info("Tokenizing (from %d rows of text)%s; caching the result in %s", len(rows), why, path)
    os.makedirs(root, exist_ok=True)
    _remove_dead_builds(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{BUILD_PREFIX}{os.getpid()}@{socket.gethostname()}-") as workdir:
        samples = recipe.build(rows, max_samples, workdir)
        if len(samples) == 0:
            return samples  # nothing worth caching; the caller reports it
        staging = os.path.join(workdir, "samples")
        os.makedirs(staging)
        built = whole_file(samples)
        if built is not None:  # the build's own file (all blocks, packed): moved, not written again
            digest, size = written_digest(built)
            os.replace(built, os.path.join(staging, SAMPLES_FILE))
        else:  # a prefix (--max_train_samples), or several files: by plain reads (utils/data/arrow_files.py)
            digest, size = write_rows(samples, os.path.join(staging, SAMPLES_FILE))
        write_json(os.path.join(staging, CHECKSUM_FILE), {"file": SAMPLES_FILE, "size": size, "xxh3": digest})
        # Publish atomically: a run killed mid-save leaves no half-written entry behind.
        if replaces and os.path.isdir(path):
            shutil.rmtree(path)
        try:
            os.replace(staging, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            # Published meanwhile by a process of another node that shares this cache (each node's
            # first process prepares the data): the same key, the same samples.
            logger.info("%s was cached meanwhile by another process; using it", path)
    return Dataset.from_file(os.path.join(path, SAMPLES_FILE))


def _read_entry(path: str) -> Dataset | None:
    """The cached samples, or None (with one line) when the entry is damaged: it is then built again."""
    problem = entry_problem(path)
    if problem is None:
        try:
            samples = Dataset.from_file(os.path.join(path, SAMPLES_FILE))
        except (OSError, ValueError, pa.ArrowException) as err:  # as written, yet not Arrow that datasets reads
            problem = f"it cannot be read: {(str(err).strip().splitlines() or [type(err).__name__])[0]}"
    if problem is not None:
        logger.warning("The tokenized-data cache entry %s is damaged: %s; tokenizing again", path, problem)
        return None
    logger.info("Reusing tokenized data from %s", path)
    return samples


def entry_problem(path: str) -> str | None:
    """Why the cache entry in ``path`` is not the one that was written, or None when its file matches its checksum."""
    try:
        written = read_json(os.path.join(path, CHECKSUM_FILE))
        size, digest = int(written["size"]), str(written["xxh3"])
    except (UsageError, TypeError, KeyError, ValueError):
        return f"its {CHECKSUM_FILE} cannot be read"
    samples = os.path.join(path, SAMPLES_FILE)
    if not os.path.isfile(samples):
        return f"{SAMPLES_FILE} is missing"
    if os.path.getsize(samples) != size:
        return f"{SAMPLES_FILE} has {os.path.getsize(samples)} bytes, not the {size} it was written with"
    if file_digest(samples)[0] != digest:
        return f"{SAMPLES_FILE} has changed since it was written (its checksum differs)"
    return None


SAMPLES_FILE = "samples.arrow"  # an entry is a folder holding this one Arrow file
CHECKSUM_FILE = "checksum.json"  # ... and its checksum and size, written as the entry was built
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


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens, tokenizer.padding_side])
    return hashlib.sha256((content + extra).encode()).hexdigest()
