"""The tokenized-data cache: a prepared split stored under a key of everything that made it.

An entry is built in a work folder of its own (``.build-PID@HOST-...``) and renamed into place
when complete, so a run killed while tokenizing leaves no half-written entry; work folders of
processes of this machine that are gone are removed by the next build.
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

from utils.data.arrow_files import whole_file, write_rows

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
            os.replace(built, os.path.join(staging, SAMPLES_FILE))
        else:  # a prefix (--max_train_samples), or several files: by plain reads (utils/data/arrow_files.py)
            write_rows(samples, os.path.join(staging, SAMPLES_FILE))
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
    """The cached samples, or None (with one line) when the entry cannot be read: it is then built again."""
    try:
        samples = Dataset.from_file(os.path.join(path, SAMPLES_FILE))
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, emptied, not Arrow at all
        logger.warning("The tokenized-data cache entry %s cannot be read (%s); tokenizing again", path,
                       (str(err).strip().splitlines() or [type(err).__name__])[0])
        return None
    logger.info("Reusing tokenized data from %s", path)
    return samples


SAMPLES_FILE = "samples.arrow"  # an entry is a folder holding this one Arrow file
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
