"""Checkpoints that are complete or absent: their names, their completion marker, publishing and clearing.

A checkpoint is written into ``OUTPUT_DIR/tmp-checkpoint-N/checkpoint-N`` (the Trainer's own
saving code pointed at a staging folder: ``utils/train/checkpointing.py``), its files are flushed
to disk, a marker listing every file and its size (``checkpoint_complete.json``) is written last,
and only then is it renamed to ``OUTPUT_DIR/checkpoint-N``; old checkpoints are rotated out after
that. A kill at any moment therefore leaves the previous checkpoints as they were, plus at most a
``tmp-`` folder that the next save removes. The marker also holds the run's id (``RunFolder``,
utils/runs/folder.py) and a checksum of every small file. Resuming takes the newest checkpoint of
the run whose marker matches its files and says which ones it skipped.

Every name inside a checkpoint folder, and of the folders themselves, is known here only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from utils.errors import UsageError
from utils.files import fsync

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
STAGING_PREFIX = "tmp-"
MODEL_STAGING = STAGING_PREFIX + "model"  # the final model while it is saved (utils/train/checkpointing.py)
# Folders of a save that a kill cut off: a staged checkpoint, one moved aside, the final model's staging.
LEFTOVER = re.compile(rf"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-\d+(-old)?|{re.escape(MODEL_STAGING)}")
CHECKSUM_MAX_BYTES = 1 << 20  # files up to this size get a checksum in the marker (json, RNG states, ...)


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


def newest_complete_checkpoint(output_dir: str, quiet: bool = False, run_id: str | None = None) -> str | None:
    """The newest checkpoint (of run ``run_id``, when given) whose files match its marker; logs the ones skipped."""
    for _, path in checkpoint_dirs(output_dir):
        problem = checkpoint_problem(path) or _other_run(path, run_id)
        if problem is None:
            return path
        if not quiet:
            logger.warning("Skipping %s: %s", path, problem)
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint in ``path`` cannot be resumed from, or None when it is complete."""
    try:
        files = read_marker(path)["files"]
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
    for name, digest in read_marker(path).get("sha256", {}).items():
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
    # Written by another program or an older version of this suite: the user vouches for it.
    logger.warning("--resume_from_checkpoint %s has no completion marker; using it as asked", path)
    return path


def read_marker(path: str) -> dict:
    with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f)


def _other_run(path: str, run_id: str | None) -> str | None:
    """Why a complete checkpoint is not this run's; one written without an id is taken as it is."""
    written_by = read_marker(path).get("run_id")
    if run_id is None or written_by is None or written_by == run_id:
        return None
    return f"it belongs to an earlier run in this folder (run {written_by}, this run is {run_id})"


# ---------------------------------------------------------------------------- writing


def write_marker(folder: str, step: int, run_id: str | None = None) -> None:
    """Flush every file to disk, then list them with their sizes (and small ones' checksums) in the marker."""
    files, checksums = {}, {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            fsync(path)
            relative = os.path.relpath(path, folder)
            files[relative] = os.path.getsize(path)
            if files[relative] <= CHECKSUM_MAX_BYTES:
                checksums[relative] = _sha256(path)
    marker = os.path.join(folder, COMPLETE_MARKER)
    content = {"global_step": step, "run_id": run_id, "files": files, "sha256": checksums}
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
    """Once a new checkpoint is complete: drop the oldest beyond ``--save_total_limit`` (never the best)."""
    rotate_checkpoints(run_dir, save_total_limit, best, use_mtime=True)


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
