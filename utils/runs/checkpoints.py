"""Checkpoints that are complete or absent: their names, their completion marker, publishing and clearing.

A checkpoint is written into ``OUTPUT_DIR/tmp-checkpoint-N/checkpoint-N`` (the Trainer's own
saving code pointed at a staging folder: ``utils/train/checkpointing.py``), its files are flushed
to disk, a marker listing every file and its size (``checkpoint_complete.json``) is written last,
and only then is it renamed to ``OUTPUT_DIR/checkpoint-N``; old checkpoints are rotated out after
that. A kill at any moment therefore leaves the previous checkpoints as they were, plus at most a
``tmp-`` folder that the next save (or the run's end) removes. The marker also holds what wrote
the checkpoint, the run's id and its command's fingerprint (``RunFolder``, utils/runs/folder.py),
and a fast checksum (xxh3-128) of every file, taken from the bytes as they are saved
(utils/train/save_digests.py) or, for the few small files written otherwise, in the pass that
flushes them to disk. Resuming takes the newest checkpoint of the run whose
marker matches its files and says which ones it skipped; one whose files no longer match its
marker (rotted, edited, truncated) is moved aside to ``damaged-checkpoint-N``, never deleted.

Rotation goes by step number, and a checkpoint is renamed aside (``tmp-checkpoint-N-old``) before
it is deleted, so a kill during the deletion leaves no half-deleted ``checkpoint-N`` to be counted.

Every name inside a checkpoint folder, and of the folders themselves, is known here only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from utils.errors import UsageError
from utils.files import file_digest, fsync

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
STAGING_PREFIX = "tmp-"
MODEL_STAGING = STAGING_PREFIX + "model"  # the final model while it is saved (utils/train/checkpointing.py)
# Folders of a save that a kill cut off: a staged checkpoint, one moved aside, the final model's staging.
LEFTOVER = re.compile(rf"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-\d+(-old)?|{re.escape(MODEL_STAGING)}")
DAMAGED_PREFIX = "damaged-"  # a checkpoint whose files no longer match its marker, kept for a look


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def staging_folder(run_dir: str, step: int) -> str:
    """Where checkpoint ``step`` is written before it is published."""
    return os.path.join(run_dir, STAGING_PREFIX + checkpoint_name(step))


# ---------------------------------------------------------------------------- finding


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint-N folder, newest first."""
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def newest_complete_checkpoint(output_dir: str, quiet: bool = False, run_id: str | None = None,
                               move_damaged: bool = False) -> str | None:
    """The newest checkpoint (of run ``run_id``, when given) whose files match its marker; logs the ones skipped.

    With ``move_damaged`` (the process that writes the folder), a checkpoint that was complete
    (it has its marker) but whose files no longer match it is moved aside, so that no later run
    trips over it again.
    """
    for _, path in checkpoint_dirs(output_dir):
        problem = _other_run(path, run_id) or checkpoint_problem(path)
        if problem is None:
            return path
        if move_damaged and os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and _other_run(path, run_id) is None:
            aside = _move_damaged(path)
            logger.warning("%s is damaged (%s): moved to %s; resuming from an older checkpoint if one is intact",
                           path, problem, aside)
        elif not quiet:
            logger.warning("Skipping %s: %s", path, problem)
    return None


def _move_damaged(path: str) -> str:
    target, n = os.path.join(os.path.dirname(path), DAMAGED_PREFIX + os.path.basename(path)), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(os.path.dirname(path), f"{DAMAGED_PREFIX}{os.path.basename(path)}.{n}")
    os.rename(path, target)
    return target


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint in ``path`` cannot be resumed from, or None when it is complete."""
    try:
        marker = read_marker(path)
        files = marker["files"]
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} (cut off while being written, or written by another program)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} cannot be read"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, not the {size} it was written with"
    for name, digest in marker.get("xxh3", {}).items():
        if file_digest(os.path.join(path, name))[0] != digest:
            return f"{name} has changed since it was written (its checksum differs)"
    for name, digest in marker.get("sha256", {}).items():  # markers of earlier versions: small files only
        if _sha256(os.path.join(path, name)) != digest:
            return f"{name} has changed since it was written (its checksum differs)"
    return None


def given_checkpoint(path: str) -> str:
    """``--resume_from_checkpoint PATH``, checked: a damaged checkpoint of ours is refused."""
    if not os.path.isdir(path):
        raise UsageError(f"--resume_from_checkpoint {path}: no such folder")
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    if os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        raise UsageError(f"--resume_from_checkpoint {path} is damaged: {problem}")
    if not any(name.startswith("optimizer") for name in os.listdir(path)):
        # A final model (a finished run's folder): the Trainer would load its weights and silently
        # start the optimizer and the learning-rate schedule afresh.
        inside = newest_complete_checkpoint(path, quiet=True) if os.path.isdir(path) else None
        use = f"pass its {inside} to resume that run" if inside else "pass a checkpoint-N folder to resume"
        raise UsageError(
            f"--resume_from_checkpoint {path} is not a checkpoint (it holds no optimizer state, so the optimizer and "
            f"schedule would start afresh): {use}, or --model_name_or_path {path} to start a new run from its model")
    # Written by another program or an older version of this suite: the user vouches for it.
    logger.warning("--resume_from_checkpoint %s has no completion marker; using it as asked", path)
    return path


def read_marker(path: str) -> dict:
    with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f)


def _other_run(path: str, run_id: str | None) -> str | None:
    """Why a complete checkpoint is not this run's; one written without an id is taken as it is."""
    try:
        written_by = read_marker(path).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None  # no readable marker: checkpoint_problem says so
    if run_id is None or written_by is None or written_by == run_id:
        return None
    return f"it belongs to an earlier run in this folder (run {written_by}, this run is {run_id})"


# ---------------------------------------------------------------------------- writing


def write_marker(folder: str, step: int, run_id: str | None = None,
                 written: dict[str, tuple[str, int]] | None = None, command: str | None = None) -> None:
    """Flush every file to disk, then list them with their sizes and checksums in the marker.

    The marker also says what wrote the checkpoint: the run's id and its command's fingerprint
    (``RunFolder``), so that a folder whose record is lost still tells its own work from another's.

    ``written`` holds the digests taken as files were saved (utils/train/save_digests.py); a file
    it does not cover, or whose size has changed since, is read once here, hashed and flushed in
    that one pass.
    """
    files, checksums = {}, {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            known = (written or {}).get(os.path.abspath(path))
            if known is not None and known[1] == os.path.getsize(path):
                fsync(path)
                checksums[relative], files[relative] = known
            else:
                checksums[relative], files[relative] = file_digest(path, flush=True)
    marker = os.path.join(folder, COMPLETE_MARKER)
    content = {"global_step": step, "run_id": run_id, "command": command, "files": files, "xxh3": checksums}
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def publish(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final``; an existing ``final`` (a run started over) is moved aside first."""
    aside = _aside(final)
    if os.path.exists(final):
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staged, final)
    fsync(os.path.dirname(final))  # the rename itself survives a crash of the machine
    shutil.rmtree(aside, ignore_errors=True)


def rotate(run_dir: str, save_total_limit: int | None, best: str | None) -> None:
    """Once a new checkpoint is complete: drop the oldest by step beyond ``--save_total_limit`` (never the best).

    Each goes by a rename first, so a kill while deleting leaves a ``tmp-...-old`` folder that is
    never counted as a checkpoint (and that the next save removes), not a half-deleted one.
    """
    if not save_total_limit or save_total_limit <= 0:
        return
    order = [path for _, path in checkpoint_dirs(run_dir)]  # newest first
    best = next((path for path in order if best is not None and os.path.abspath(path) == os.path.abspath(best)), None)
    limit = save_total_limit
    if best is not None and best != order[0]:
        # As the Trainer does: the best one is kept next to the newest (so a limit of 1 keeps both).
        order.remove(best)
        order.insert(1, best)
        limit = max(limit, 2)
    keep = set(order[:limit])
    for path in order:
        if path not in keep:
            logger.info("Deleting older checkpoint [%s] due to save_total_limit", path)
            _delete(path)


def _delete(path: str) -> None:
    aside = _aside(path)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def clear_checkpoints(output_dir: str) -> None:
    """Starting over: move every checkpoint out of the way (renames), then delete them."""
    aside = []
    for _, path in checkpoint_dirs(output_dir):
        target = _aside(path)
        os.rename(path, target)
        aside.append(target)
    if aside:
        logger.info("Starting over: removed %d checkpoint(s) of the earlier run in %s", len(aside), output_dir)
    remove_leftovers(output_dir)


def remove_leftovers(run_dir: str) -> None:
    """Staging folders of saves that were cut off (saves never overlap, so none is in use)."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if LEFTOVER.fullmatch(name):
            logger.info("Removing %s, left by a save that was cut off", os.path.join(run_dir, name))
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _aside(path: str) -> str:
    """Where a checkpoint is moved before it is deleted or replaced; removed by ``remove_leftovers``."""
    return os.path.join(os.path.dirname(path), f"{STAGING_PREFIX}{os.path.basename(path)}-old")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
