"""Where a training run starts, and checkpoints that are complete or absent.

A checkpoint is written into ``OUTPUT_DIR/tmp-checkpoint-N/checkpoint-N`` (the Trainer's own
saving code, pointed at a staging folder), its files are flushed to disk, a marker listing
every file and its size (``checkpoint_complete.json``) is written last, and only then is it
renamed to ``OUTPUT_DIR/checkpoint-N``; old checkpoints are rotated out after that. A kill at
any moment therefore leaves the previous checkpoints as they were, plus at most a ``tmp-``
folder that the next save removes. The marker also holds the run's id (utils/run_folder.py) and
a checksum of every small file. Resuming takes the newest checkpoint of this run whose marker
matches its files and says which ones it skipped. Starting over (--overwrite_output_dir) records
the new run first and then clears the old run's checkpoints, so a kill in between leaves old
checkpoints that no longer count, never a mix.
"""

import hashlib
import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .errors import UsageError
from .run_folder import (RUN_STATE, TRAINING, RunStart, claim_output_dir, claimed_run, current_run_id,
                         current_umask)

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
STAGING_PREFIX = "tmp-"
# What a run leaves in --output_dir that is not a result to protect: the launchers' logs, the
# run_info.json written at every start, our own staging folders cut off by a kill, the run's
# record, and TensorBoard's runs/ of a run killed before its first checkpoint.
NOT_RESULTS = re.compile(r"train(_node\d+)?\.log|run_info\.json|tmp-checkpoint-\d+(-old)?|tmp-model"
                         rf"|{re.escape(RUN_STATE)}(\.tmp)?|runs")
CHECKSUM_MAX_BYTES = 1 << 20  # files up to this size get a checksum in the marker (json, RNG states, ...)


# ---------------------------------------------------------------------------- resuming


def checkpoint_to_resume(training_args) -> str | None:
    """The checkpoint to resume from; refuses to write into a non-empty --output_dir that has none.

    Also checks, before any work, that --output_dir can be written (training or not), and takes
    the folder's lock (utils/run_folder.py), the writing process first. Nothing is written yet:
    every process comes to the same decision, and ``begin_run`` records it once the inputs are
    known to be good.
    """
    check_output_dir(training_args.output_dir)
    with training_args.main_process_first(local=False, desc="claiming --output_dir"):
        run = claim_output_dir(training_args)
        return _resume_point(training_args, run)


def begin_run() -> None:
    """Before the first step: record the run; starting over, then clear the old run's checkpoints.

    The new run's id is on disk first, so a kill during the clearing leaves old checkpoints that
    no longer count, never a mix of two runs.
    """
    run = claimed_run()
    if run is None or not run.writes:
        return
    run.commit()
    if run.start_over:
        _clear_checkpoints(run.output_dir)


def _resume_point(training_args, run: RunStart) -> str | None:
    if not training_args.do_train or run.state.stage != TRAINING:
        return None  # evaluation only, or training done before (utils.trainer.train_and_save)
    if training_args.resume_from_checkpoint:
        return _given_checkpoint(training_args.resume_from_checkpoint)
    output_dir = training_args.output_dir
    if run.start_over or not os.path.isdir(output_dir):
        return None
    last = newest_complete_checkpoint(output_dir, run_id=run.run_id if run.recorded else None)
    if last is not None:
        # A folder without a record (checkpoints copied in, an older version): go on as that run.
        run.state.run_id = run.run_id if run.recorded else _marker(last).get("run_id") or run.run_id
        logger.info("Resuming from %s (%s)", last, "the same command as the run there" if training_args.overwrite_output_dir
                    else "add --overwrite_output_dir to start over")
        return last
    if training_args.overwrite_output_dir:
        run.start_over = True  # nothing of this run to resume: start over, as asked
        return None
    if [name for name in os.listdir(output_dir) if not NOT_RESULTS.fullmatch(name)]:
        incomplete = [path for _, path in checkpoint_dirs(output_dir)]
        hint = (f" (its {', '.join(map(os.path.basename, incomplete))} is incomplete: pass "
                f"--resume_from_checkpoint {incomplete[0]} to use it anyway)") if incomplete else ""
        raise UsageError(
            f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from{hint}; "
            "choose another folder, or add --overwrite_output_dir to train over it"
        )
    return None


def check_output_dir(output_dir: str) -> None:
    """A folder we can write into, or one we can create; checked without creating anything."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {output_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir}: {existing} is not writable")


def _given_checkpoint(path: str) -> str:
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
        with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
            files = json.load(f)["files"]
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
    for name, digest in _marker(path).get("sha256", {}).items():
        if _sha256(os.path.join(path, name)) != digest:
            return f"{name} has changed since it was written (its checksum differs)"
    return None


def _marker(path: str) -> dict:
    with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f)


def _other_run(path: str, run_id: str | None) -> str | None:
    """Why a complete checkpoint is not this run's; one written without an id is taken as it is."""
    written_by = _marker(path).get("run_id")
    if run_id is None or written_by is None or written_by == run_id:
        return None
    return f"it belongs to an earlier run in this folder (run {written_by}, this run is {run_id})"


def _clear_checkpoints(output_dir: str) -> None:
    """Starting over: move every checkpoint out of the way (renames), then delete them."""
    aside = []
    for _, path in checkpoint_dirs(output_dir):
        target = _aside(path)
        os.rename(path, target)
        aside.append(target)
    if aside:
        logger.info("Starting over: removed %d checkpoint(s) of the earlier run in %s", len(aside), output_dir)
    _remove_leftovers(output_dir)


# ---------------------------------------------------------------------------- saving


class AtomicCheckpointsMixin:
    """Trainer mixin: the Trainer's own ``_save_checkpoint``, into a staging folder, published complete.

    While a checkpoint is written, ``_get_output_dir`` returns the staging folder, so the Trainer
    writes ``<staging>/checkpoint-N`` with all its usual files on every process. Only this class
    sets and reads that folder.
    """

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            _remove_leftovers(run_dir)  # folders of a save that was killed; saves never overlap
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        staged = os.path.join(staging, name)
        _point_best_checkpoint_at(self, staging, run_dir, staged)
        if self.args.should_save:
            _write_marker(staged, self.state.global_step, current_run_id(self.args.output_dir))
            _publish(staged, os.path.join(run_dir, name))
            os.rmdir(staging)
            # Only now that the new checkpoint is complete may older ones go.
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()


def _aside(path: str) -> str:
    """Where a checkpoint is moved before it is deleted or replaced; removed by ``_remove_leftovers``."""
    return os.path.join(os.path.dirname(path), f"{STAGING_PREFIX}{os.path.basename(path)}-old")


def _remove_leftovers(run_dir: str) -> None:
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name.startswith(STAGING_PREFIX) and NOT_RESULTS.fullmatch(name):
            logger.info("Removing %s, left by a save that was cut off", os.path.join(run_dir, name))
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _point_best_checkpoint_at(trainer, staging: str, run_dir: str, staged: str) -> None:
    # The Trainer recorded the best checkpoint under the staging path when it is this one;
    # every process fixes it (each loads the best model at the end), the saving one also on disk.
    best = trainer.state.best_model_checkpoint
    if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if trainer.args.should_save:
            trainer.state.save_to_json(os.path.join(staged, "trainer_state.json"))


def _write_marker(folder: str, step: int, run_id: str | None = None) -> None:
    """Flush every file to disk, then list them with their sizes (and small ones' checksums) in the marker."""
    files, checksums = {}, {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            _fsync(path)
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


def _publish(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final``; an existing ``final`` (a run started over) is moved aside first."""
    aside = _aside(final)
    if os.path.exists(final):
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staged, final)
    _fsync(os.path.dirname(final))  # the rename itself survives a crash of the machine
    shutil.rmtree(aside, ignore_errors=True)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_atomically(trainer) -> None:
    """``trainer.save_model()`` into --output_dir, each file replaced whole (never half-written).

    The model is saved into ``OUTPUT_DIR/tmp-model`` and its files are then renamed over the
    old ones, so a kill leaves every file either old or new.
    """
    output_dir = trainer.args.output_dir
    staging = os.path.join(output_dir, STAGING_PREFIX + "model")
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if not trainer.args.should_save:
        return
    for name in os.listdir(staging):
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source):  # save_pretrained writes files; a folder is replaced as a whole
            shutil.rmtree(target, ignore_errors=True)
        else:
            _fsync(source)
            # safetensors writes through a private temporary file (mode 0600): give the model the
            # permissions every other output has, so that others in the group can read it.
            os.chmod(source, 0o666 & ~current_umask())
        os.replace(source, target)
    os.rmdir(staging)
