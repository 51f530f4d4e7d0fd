"""Failures in the middle of a run that the user can fix, turned into one ``error:`` line.

* **Unreadable data found mid-stream.** With ``--streaming`` the files are read while training,
  so a broken file (bad JSON, not UTF-8, ...) surfaces deep inside the training loop. It is
  recognised by where it was raised: in one of datasets' file readers, whose frame holds the
  file it was reading.
* **A full disk while saving.** A checkpoint or the final model that does not fit is reported
  with what is still safe: checkpoints are published only once complete (utils/runs/checkpoints.py),
  so the earlier ones are intact. The unfinished staging folder is removed to give the space back.
  Only some writers raise ``ENOSPC``; torch's raises a bare ``RuntimeError`` ("iostream error"),
  so a save that fails while the disk has less room left than the model's weights need counts too.

``run_guard(trainer)`` wraps training and the final save; both checks happen only on failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

from utils.data.raw import READERS, file_being_read
from utils.runs.checkpoints import STAGING_PREFIX, newest_complete_checkpoint
from utils.errors import UsageError
from utils.files import NO_SPACE

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_guard(trainer):
    """Turn unreadable streamed data and a full disk into UsageError; anything else passes."""
    try:
        yield
    except (UsageError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:
        problem = unreadable_data(err) or out_of_space(err, trainer)
        if problem is None:
            raise
        raise UsageError(problem) from None


# ---------------------------------------------------------------------------- unreadable data


def unreadable_data(err: BaseException) -> str | None:
    """The one-line report for an error raised while datasets read a file, else None."""
    file = file_being_read(err)
    # A DataLoader worker's error arrives as a copy whose message holds the worker's traceback.
    in_worker = READERS in str(err) and "Original Traceback" in str(err)
    if file is None and not in_worker:
        return None
    message = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    where = f"{file}" if file is not None else "a data file (read by a DataLoader worker)"
    return (f"{where} cannot be read, found while streaming the data: {message}; fix or remove that file "
            "(checkpoints saved before it are kept: run the same command again to resume)")


# ---------------------------------------------------------------------------- full disk


def out_of_space(err: BaseException, trainer) -> str | None:
    """The one-line report for a save that failed on a full disk, else None. Cleans the staging folder."""
    output_dir = trainer.args.output_dir
    if not os.path.isdir(output_dir):
        return None
    staged = _staging_folders(output_dir)
    if not _full_disk(err, output_dir, staged, _weights_bytes(trainer.model)):
        return None
    for path in staged:  # the unfinished save: useless, and it holds the space the user needs
        shutil.rmtree(path, ignore_errors=True)
    free = shutil.disk_usage(output_dir).free
    last = newest_complete_checkpoint(output_dir, quiet=True)
    safe = f"{last} and the checkpoints before it are complete and untouched" if last else \
        "no checkpoint had been saved yet"
    what = ", ".join(os.path.basename(path).removeprefix(STAGING_PREFIX) for path in staged) or "the results"
    removed = " after removing the unfinished save" if staged else ""
    return (f"no space left on the disk of --output_dir {output_dir} while saving {what} "
            f"({_megabytes(free)} MB free{removed}): {safe}; free some space (or lower --save_total_limit) "
            "and run the same command again to resume")


def _staging_folders(output_dir: str) -> list[str]:
    return [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))
            if name.startswith(STAGING_PREFIX) and os.path.isdir(os.path.join(output_dir, name))]


def _full_disk(err: BaseException, output_dir: str, staged: list[str], needed: int) -> bool:
    """Did ``err`` come from --output_dir's disk running out of room?"""
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            if cause.filename:  # another disk (e.g. /dev/shm for DataLoader workers) is not ours to report
                return _inside(os.fspath(cause.filename), output_dir)
            return shutil.disk_usage(output_dir).free < needed
    # No errno to go by: a save that failed where not even the weights would fit any more.
    return bool(staged) and shutil.disk_usage(output_dir).free < needed


def _inside(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f}"
