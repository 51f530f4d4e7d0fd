"""One run at a time in --output_dir, and how far that run has come.

* **The lock.** The process that writes (global rank 0) holds an exclusive ``flock`` on the
  folder itself from the start until it exits. The kernel drops it when the process ends, however
  it ends (a SIGKILL too), so a crashed run never leaves a stale lock: the next run simply gets
  it. A second run into a locked folder stops with one line.
* **The run's record**, ``OUTPUT_DIR/run_state.json``: a random id, new whenever a run starts
  from step 0; a fingerprint of the command that last ran it (its arguments); and its stage,
  ``training``, ``trained`` (final model and train results written, evaluation not done) or
  ``finished``. Checkpoints carry the id (utils/checkpoints.py), so that a resume never takes a
  checkpoint of an earlier run left in the same folder.
* **What a start decides** (``claim_output_dir``): the same command as a finished run is a no-op
  (``NothingToDo``); as a trained one it only evaluates; as an unfinished one it resumes, with or
  without ``--overwrite_output_dir`` (a preempted ``--overwrite_output_dir`` command resumes when
  run again). Another command resumes an unfinished run, starts over with
  ``--overwrite_output_dir``, and is refused in a finished run's folder without it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import sys
import uuid
from dataclasses import asdict, dataclass

from .errors import UsageError

logger = logging.getLogger(__name__)

RUN_STATE = "run_state.json"
TRAINING, TRAINED, FINISHED = "training", "trained", "finished"


class NothingToDo(Exception):
    """The run asked for is already done: the script prints this one line and exits with 0."""


@dataclass
class RunState:
    run_id: str
    command: str
    stage: str = TRAINING


@dataclass
class RunStart:
    """How this process starts in --output_dir; ``commit()`` records it (on the writing process)."""

    output_dir: str
    state: RunState
    start_over: bool  # step 0, whatever checkpoints the folder holds (they are cleared)
    writes: bool
    recorded: bool = True  # the folder had a record; without one (copied checkpoints) any checkpoint may be resumed

    @property
    def run_id(self) -> str:
        return self.state.run_id

    def commit(self) -> None:
        if self.writes:
            write_run_state(self.output_dir, self.state)


# The one claim of this process: the lock's file descriptor and what it started.
_claim: dict = {}


def command_fingerprint() -> str:
    """The script and its arguments (and a single .json file of flags, by content)."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json") and os.path.isfile(sys.argv[1]):
        with open(sys.argv[1], "rb") as f:
            argv.append(hashlib.sha256(f.read()).hexdigest())
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:16]


def read_run_state(output_dir: str) -> RunState | None:
    try:
        with open(os.path.join(output_dir, RUN_STATE), encoding="utf-8") as f:
            data = json.load(f)
        return RunState(str(data["run_id"]), str(data["command"]), str(data["stage"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("Ignoring %s: it cannot be read", os.path.join(output_dir, RUN_STATE))
        return None


def current_run_id(output_dir: str) -> str | None:
    state = read_run_state(output_dir)
    return state.run_id if state else None


def write_run_state(output_dir: str, state: RunState) -> None:
    """Replace run_state.json whole: a kill leaves the old record or the new one."""
    path = os.path.join(output_dir, RUN_STATE)
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(asdict(state), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(staging, 0o666 & ~current_umask())
    os.replace(staging, path)


def claim_output_dir(training_args) -> RunStart:
    """Lock --output_dir (the writing process) and decide how this run starts in it."""
    output_dir = training_args.output_dir
    writes = training_args.should_save
    if writes:
        _lock(output_dir)
    command = command_fingerprint()
    on_disk = state = read_run_state(output_dir) if os.path.isdir(output_dir) else None
    same = state is not None and state.command == command
    if state is not None and state.stage != TRAINING:
        if same and state.stage == FINISHED:
            raise NothingToDo(
                f"nothing to do: {output_dir} holds the finished run of this same command, left as it is "
                "(delete the folder or choose another --output_dir to run it again)")
        if not same and not training_args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {output_dir} holds a finished run of another command, whose model and results "
                "this run would replace; choose another --output_dir, or add --overwrite_output_dir to replace them")
    start_over = training_args.overwrite_output_dir and not same
    if state is None or start_over:
        state = RunState(uuid.uuid4().hex[:12], command)
    else:
        state = RunState(state.run_id, command, state.stage)  # the run goes on under this command
    # An evaluation-only run keeps the record of a training run it evaluates into (with
    # --overwrite_output_dir over a finished one): it must not mark that run finished.
    records = writes and (training_args.do_train or start_over or on_disk is None)
    start = RunStart(output_dir, state, start_over, records, recorded=on_disk is not None)
    _claim["start"] = start
    return start


def claimed_run() -> RunStart | None:
    """What ``claim_output_dir`` decided in this process, if it ran."""
    return _claim.get("start")


def training_done(output_dir: str) -> bool:
    """This run's final model is written (a rerun after a stop during its evaluation)."""
    state = read_run_state(output_dir) if os.path.isdir(output_dir) else None
    return state is not None and state.stage in (TRAINED, FINISHED)


def mark(stage: str) -> None:
    """Record the run's progress (TRAINED, FINISHED), on the process that claimed the folder."""
    start = _claim.get("start")
    if start is not None and start.writes:
        start.state.stage = stage
        start.commit()


def release_output_dir() -> None:
    """After a refused start: unlock, and remove the folder if this run made it and it is empty."""
    _claim.pop("dir", None)
    fd = _claim.pop("fd", None)
    if fd is not None:
        os.close(fd)
    created = _claim.pop("created", None)
    if created:
        try:
            os.rmdir(created)
        except OSError:
            pass  # something is in it now: leave it


def _lock(output_dir: str) -> None:
    if _claim.get("dir") == output_dir:
        return
    release_output_dir()  # one claim per process (a notebook or a test may claim several folders in turn)
    _claim["dir"] = output_dir
    if not os.path.isdir(output_dir):
        os.makedirs(output_dir)
        _claim["created"] = output_dir
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            release_output_dir()
            raise UsageError(
                f"--output_dir {output_dir} is in use by another run (it holds the folder's lock); wait for it "
                "to end, or choose another --output_dir") from None
        # Some network file systems cannot lock folders: go on, as before there was a lock.
        logger.warning("Cannot lock --output_dir %s (%s); make sure no other run writes into it", output_dir,
                       err.strerror)
        return
    _claim["fd"] = fd  # held until the process exits


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
