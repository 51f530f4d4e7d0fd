"""--output_dir as one run holds it: its lock, its record (utils/runs/record.py), and what this start does there.

``RunFolder.claim(training_args)`` is called once by every recipe and the ``RunFolder`` it returns
is passed on (to ``train_and_evaluate``): no other module decides about the folder.

* **The lock.** The process that writes (global rank 0) holds an exclusive ``flock`` on the
  folder itself from the claim until it exits. The kernel drops it when the process ends, however
  it ends (a SIGKILL too), so a crashed run never leaves a stale lock: the next run simply gets
  it. A second run into a locked folder stops with one line.
* **The run's record**, ``OUTPUT_DIR/run_state.json``: a random id, new whenever a run starts
  from step 0; a fingerprint of the command that last ran it (its parsed settings,
  ``utils.flags.run_identity.settings_fingerprint``); and its stage (``STAGES``, in order):
  ``claimed`` (the folder is this run's, no step taken), ``training``, ``trained`` (final model
  and train results written), ``evaluated`` (eval_results.json written) and ``finished``. Each
  stage is written, whole, before the work that follows it, so that a rerun after a crash at any
  point does only what is left (utils/train/steps.py). Checkpoints carry the id and the
  command's fingerprint (utils/runs/checkpoints.py), so that a resume never takes a checkpoint of
  an earlier run left in the same folder, and a record lost from a folder that holds a run's
  results is rebuilt from the newest checkpoint for the command that wrote it only (any other is
  refused with one line). A full disk while the record is written is one line too; the record
  stays as it was.
* **What a start decides**: the same command as a finished run is a no-op (``NothingToDo``); as a
  trained one it only evaluates, as an evaluated one it only writes the reports; as an unfinished
  one it resumes, with or without ``--overwrite_output_dir`` (a preempted
  ``--overwrite_output_dir`` command resumes when run again). Another command resumes an
  unfinished run, starts over with ``--overwrite_output_dir``, and is refused in a finished run's
  folder without it. A run that finishes clears what saves that were cut off left behind.

A launcher that starts the processes of a run itself (scripts/ray_train.py) asks
``RunFolder.check_before_workers`` first: the lock and a finished run of the same command are
answered there before anything starts; the processes claim the folder as any run does.

Used as a context manager (``with RunFolder.claim(args) as run:``), a start refused with a
``UsageError`` lets the lock go and removes the folder if the claim made it and it is still empty.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from dataclasses import asdict

from utils.errors import NothingToDo, UsageError
from utils.files import NO_SPACE, write_json
from utils.runs.checkpoints import (DAMAGED_PREFIX, checkpoint_dirs, clear_checkpoints, given_checkpoint,
                                    newest_complete_checkpoint, read_marker, remove_leftovers)
from utils.runs.record import (FINISHED, NOT_RESULTS, RUN_STATE, STAGES, TRAINED, TRAINING, UNFINISHED, RunState,
                               read_run_state, run_results)
from utils.runs.resume_check import check_resumable

logger = logging.getLogger(__name__)

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


def describe_output_dir(args) -> str:
    """--output_dir as the logs name it: the full path, and when it was not given, that it is the default."""
    path = os.path.abspath(args.output_dir)
    if getattr(args, "output_dir_given", True):
        return path
    return f"{path} (--output_dir not given: transformers' default, trainer_output)"


class RunFolder:
    """This process's claim on --output_dir (see the module doc)."""

    def __init__(self, output_dir: str, writes: bool):
        self.output_dir = output_dir
        self.writes = writes  # the process that writes the folder (global rank 0)
        self.state: RunState | None = None
        self.start_over = False  # step 0, whatever checkpoints the folder holds (they are cleared)
        self.records = False  # this start writes the run's record
        self.recorded = True  # the folder had a record; without one (copied checkpoints) any checkpoint counts
        self.checkpoint: str | None = None  # what training resumes from
        self.resume_given = False  # the checkpoint came from --resume_from_checkpoint
        self.fsdp = False  # this run shards the model with --fsdp (whose checkpoints are laid out otherwise)
        self._lock_fd: int | None = None
        self._created = False

    # ------------------------------------------------------------------ the claim

    @classmethod
    def claim(cls, training_args) -> RunFolder:
        """Lock --output_dir (the writing process first) and decide how this run starts in it.

        Nothing is written yet: every process comes to the same decision, and ``begin`` records
        it once the inputs are known to be good.
        """
        check_output_dir(training_args.output_dir)
        folder = cls(training_args.output_dir, writes=training_args.should_save)
        if folder.writes:  # named before any work, the default folder too
            logger.info("Output folder: %s", describe_output_dir(training_args))
        with training_args.main_process_first(local=False, desc="claiming --output_dir"):
            if folder.writes:
                folder._lock()
            try:
                folder._decide(training_args)
            except BaseException:
                folder.release(refused=True)
                raise
        return folder

    @classmethod
    def check_before_workers(cls, output_dir: str, fingerprint: str) -> None:
        """What a launcher can tell before it starts the workers of the command ``fingerprint``: ``UsageError``
        when another run holds the folder's lock, ``NothingToDo`` when it holds this command's finished run."""
        if not os.path.isdir(output_dir):
            return
        folder = cls(output_dir, writes=True)
        folder._lock()
        try:
            folder._check_finished(read_run_state(output_dir), fingerprint)
        finally:
            folder.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.release(refused=kind is not None and issubclass(kind, UsageError))

    def _decide(self, args) -> None:
        command = args.run_fingerprint
        on_disk = self._read_record(args) if os.path.isdir(self.output_dir) else None
        same = on_disk is not None and on_disk.command == command
        self._check_finished(on_disk, command)
        if on_disk is not None and on_disk.stage not in UNFINISHED:
            if not same and not args.overwrite_output_dir:
                raise UsageError(
                    f"--output_dir {self.output_dir} holds a finished run of another command, whose model and "
                    "results this run would replace; choose another --output_dir, or add --overwrite_output_dir to "
                    "replace them")
        self.start_over = args.overwrite_output_dir and not same
        if on_disk is None or self.start_over:
            self.state = RunState(uuid.uuid4().hex[:12], command)
        else:
            self.state = RunState(on_disk.run_id, command, on_disk.stage)  # the run goes on under this command
        # An evaluation-only run keeps the record of a training run it evaluates into (with
        # --overwrite_output_dir over a finished one): it must not mark that run finished.
        self.records = self.writes and (args.do_train or self.start_over or on_disk is None)
        self.recorded = on_disk is not None
        self.resume_given = bool(args.resume_from_checkpoint)
        self.fsdp = bool(args.fsdp)
        self.checkpoint = self._resume_point(args)

    def _read_record(self, args) -> RunState | None:
        """The run's record; when it is missing or unreadable in a folder that holds a run's results, rebuilt
        from what its newest checkpoint says wrote it, and only for that same command.

        Without a record, checkpoints alone (copied in, or a run stopped before its results) are
        resumed by any command, as an unfinished run is.
        """
        state = read_run_state(self.output_dir)
        if state is not None or not run_results(self.output_dir):
            return state
        last = newest_complete_checkpoint(self.output_dir, quiet=True)
        marker = read_marker(last) if last is not None else {}
        if marker.get("command") == args.run_fingerprint:
            logger.warning("%s is missing or unreadable: rebuilt from %s, which this same command wrote; going on "
                           "from there", os.path.join(self.output_dir, RUN_STATE), last)
            return RunState(marker.get("run_id") or uuid.uuid4().hex[:12], args.run_fingerprint, TRAINING)
        if args.overwrite_output_dir:
            return None  # start over, as asked
        if last is None:
            why = "it holds no complete checkpoint that says which command wrote them"
        elif marker.get("command"):
            why = f"its newest checkpoint, {os.path.basename(last)}, was written by another command"
        else:
            why = f"its newest checkpoint, {os.path.basename(last)}, does not say which command wrote it"
        raise UsageError(
            f"--output_dir {self.output_dir} holds a run's results, its record {RUN_STATE} is missing or unreadable, "
            f"and {why}: this run cannot take them for its own; choose another --output_dir, or add "
            "--overwrite_output_dir to replace them")

    def _check_finished(self, on_disk: RunState | None, command: str) -> None:
        if on_disk is not None and on_disk.command == command and on_disk.stage == FINISHED:
            raise NothingToDo(
                f"nothing to do: {self.output_dir} holds the finished run of this same command, left as it is "
                "(delete the folder or choose another --output_dir to run it again)")

    def _resume_point(self, args) -> str | None:
        if not args.do_train or self.training_done:
            return None  # evaluation only, or training done before (utils.train.steps.train_and_save)
        if args.resume_from_checkpoint:
            return given_checkpoint(args.resume_from_checkpoint)
        if self.start_over or not os.path.isdir(self.output_dir):
            return None
        last = newest_complete_checkpoint(self.output_dir, run_id=self.state.run_id if self.recorded else None,
                                          move_damaged=self.writes)
        if last is not None:
            # A folder without a record (checkpoints copied in, an older version): go on as that run.
            if not self.recorded:
                self.state.run_id = read_marker(last).get("run_id") or self.state.run_id
            logger.info("Resuming from %s (%s)", last, "the same command as the run there"
                        if args.overwrite_output_dir else "add --overwrite_output_dir to start over")
            return last
        if args.overwrite_output_dir:
            self.start_over = True  # nothing of this run to resume: start over, as asked
            return None
        if [name for name in os.listdir(self.output_dir) if not NOT_RESULTS.fullmatch(name)]:
            raise UsageError(f"--output_dir {self.output_dir} is not empty and holds no checkpoint to resume from"
                             f"{self._why_no_checkpoint()}; choose another folder, or add --overwrite_output_dir "
                             "to train over it")
        return None

    def describe_start(self) -> str:
        """How the run starts in the folder, as the run setup names it."""
        if self.checkpoint is not None:
            return f"resuming from {self.checkpoint}"
        if self.training_done:
            return "trained before: evaluating only"
        return "starting over (--overwrite_output_dir)" if self.start_over else "fresh start"

    def _why_no_checkpoint(self) -> str:
        incomplete = [path for _, path in checkpoint_dirs(self.output_dir)]
        damaged = sorted(name for name in os.listdir(self.output_dir) if name.startswith(DAMAGED_PREFIX))
        if incomplete:
            return (f" (its {', '.join(map(os.path.basename, incomplete))} is incomplete: pass "
                    f"--resume_from_checkpoint {incomplete[0]} to use it anyway)")
        if damaged:
            return (f": its checkpoints were found damaged (their files no longer match their checksums) and are "
                    f"kept as {', '.join(damaged)}")
        return ""

    def check_resumable(self, model) -> None:
        """The checkpoint to resume from is one this model can load (utils/runs/resume_check.py)."""
        check_resumable(self.checkpoint, model, given=self.resume_given, fsdp=self.fsdp)

    # ------------------------------------------------------------------ the record

    @property
    def run_id(self) -> str | None:
        return self.state.run_id if self.state is not None else None

    @property
    def command(self) -> str | None:
        """The fingerprint of the command running it (checkpoints carry it, for a folder that lost its record)."""
        return self.state.command if self.state is not None else None

    def reached(self, stage: str) -> bool:
        """The run's record says it got as far as ``stage`` (a run that starts over begins at ``claimed``)."""
        return self.state is not None and STAGES.index(self.state.stage) >= STAGES.index(stage)

    @property
    def training_done(self) -> bool:
        """This run's final model is written (a rerun after a stop during its evaluation)."""
        return self.reached(TRAINED)

    def begin(self) -> None:
        """Before any of the run's work: record it; starting over, then clear the old run's checkpoints.

        The new run's id is on disk first (stage ``claimed``), so a kill during the clearing leaves
        old checkpoints that no longer count, never a mix of two runs. A run that goes on keeps the
        stage it had reached.
        """
        self._write()
        if self.records and self.start_over:
            clear_checkpoints(self.output_dir)

    def finish(self) -> None:
        """The run is done: what saves that were cut off left goes now, not at a next save that never comes."""
        if self.writes:
            remove_leftovers(self.output_dir)
        self.mark(FINISHED)

    def mark(self, stage: str) -> None:
        """Record that the run reached ``stage``, before the work that follows it."""
        self.state.stage = stage
        self._write()

    def _write(self) -> None:
        if not self.records:
            return
        try:
            write_json(os.path.join(self.output_dir, RUN_STATE), asdict(self.state))
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise UsageError(f"no space left on the disk of --output_dir {self.output_dir} while writing its "
                             f"{RUN_STATE} (it is written whole or not at all, so nothing is lost): free some "
                             "space and run the same command again") from None

    # ------------------------------------------------------------------ the lock

    def _lock(self) -> None:
        if not os.path.isdir(self.output_dir):
            os.makedirs(self.output_dir)
            self._created = True
        fd = os.open(self.output_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                self.release(refused=True)
                raise UsageError(
                    f"--output_dir {self.output_dir} is in use by another run (it holds the folder's lock); wait for "
                    "it to end, or choose another --output_dir") from None
            # Some network file systems cannot lock folders: go on, as before there was a lock.
            logger.warning("Cannot lock --output_dir %s (%s); make sure no other run writes into it",
                           self.output_dir, err.strerror)
            return
        self._lock_fd = fd

    def release(self, refused: bool = False) -> None:
        """Let the lock go; after a refused start, also remove the folder if the claim made it and it is empty."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if refused and self._created:
            self._created = False
            try:
                os.rmdir(self.output_dir)
            except OSError:
                pass  # something is in it now: leave it
