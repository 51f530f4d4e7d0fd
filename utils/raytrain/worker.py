"""One Ray Train worker: one process of the recipe, its checkpoints reported to Ray, the driver's stops passed on.

``train_worker`` is the training function that ``TorchTrainer`` runs in each worker, in a thread of
Ray's worker process. Ray Train has started the process group (gloo on CPUs, nccl on GPUs) and set
RANK, LOCAL_RANK and WORLD_SIZE, so the recipe's ``main()`` runs as under torchrun:

* **The command.** It runs in the driver's working directory (relative paths mean what they meant
  there) under the command the driver passes (``Command.as_process_command``): ``run_clm.py`` with
  the user's flags, so the run folder takes it for the same command as under torchrun, and a run
  goes on under either launcher.
* **Checkpoints.** Each one is reported to Ray Train once it is complete (published with its
  marker, utils/train/checkpointing.py), in place: --output_dir is Ray's run folder, so Ray's
  ``Result.checkpoint`` is the newest checkpoint. A group that Ray restarts after a failure
  resumes as any rerun does, from the run folder's newest complete checkpoint (utils/runs/folder.py):
  never an incomplete one, and the newest even when the kill came between publishing it and reporting it.
* **Stops.** A thread polls the driver's stop (utils/raytrain/control.py) and hands it to the
  trainer's ``PreemptionCallback`` (``request_stop``), which no signal reaches in a worker
  thread: the step is finished, a checkpoint saved, and the recipe ends as on SIGTERM (exit 143).
* **Draining nodes.** When Ray reports a node of the run being drained (Ray Train's
  ``get_preemption_info``), a checkpoint is saved at once and training goes on: once the node is
  gone Ray restarts the group (``FailureConfig.max_preemption_failures``, no limit by default),
  which resumes from it.
* **Endings.** How the recipe ended (``utils.cli.ending``) is recorded for the driver. An error
  that every worker reached (bad flags, a non-finite loss) ends the run with its status. An error
  of one worker while the others wait for it (only rank 0 holds the folder's lock and writes the
  results) is raised instead, so that Ray ends the group and, as torchrun --max-restarts does,
  restarts it up to --max_failures times.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time

import ray
import ray.train
from ray.train import Checkpoint, CheckpointUploadMode
from ray.train.collective import broadcast_from_rank_zero
from transformers import TrainerCallback

from utils.cli import Command, ending
from utils.dist import any_process
from utils.errors import UsageError
from utils.runs.checkpoints import checkpoint_name
from utils.train.stops import PreemptionCallback, find_callback
from utils.train.trainer import LAUNCHER_CALLBACKS

logger = logging.getLogger(__name__)

ATTEMPT_ENV = "LM_RAY_ATTEMPT"  # this group's attempt, from 1 (Ray Train restarts the whole group after a failure)
STOP_POLL_SECONDS = 0.5  # how often a worker asks for the driver's stop
ENDING_GRACE_SECONDS = 30.0  # how long a worker that ended with an error waits for the others to end
DRAIN_CHECK_SECONDS = 2.0  # how often Ray is asked whether a node of the run is being drained


class RecipeFailed(RuntimeError):
    """A worker's recipe ended with an error while other workers had not ended: Ray Train ends the group."""


def train_worker(config: dict) -> None:
    """Ray Train's training function: ``config`` holds the recipe's command, the driver's folder and the control."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    control = config["control"]
    attempt = broadcast_from_rank_zero(ray.get(control.begin_attempt.remote()) if rank == 0 else None)
    os.environ[ATTEMPT_ENV] = str(attempt)
    if attempt > 1 and rank == 0:
        logger.warning("Ray Train restarted the group after a failure (attempt %d); its last reported checkpoint "
                       "is %s", attempt, ray.train.get_checkpoint())
    command = Command(config["script"], tuple(config["args"]))
    stops = StopWatcher(control)
    callback = lambda trainer: RayTrainCallback(trainer, stops)  # noqa: E731
    LAUNCHER_CALLBACKS.append(callback)

    def run_recipe():
        _enter(config["cwd"])
        with command.as_process_command():
            importlib.import_module(os.path.splitext(command.name)[0]).main()

    try:
        end = ending(run_recipe)
    finally:
        LAUNCHER_CALLBACKS.remove(callback)
        stops.close()
    ray.get(control.end.remote(attempt, rank, end))
    if end.status != 0 and not _all_ended(control, world_size):
        raise RecipeFailed(end.line or f"exit status {end.status}")


def _enter(folder: str) -> None:
    """Work in the driver's working directory (Ray starts its workers in a folder of its own)."""
    if not os.path.isdir(folder):
        raise UsageError(f"the folder ray_train.py was started in, {folder}, is not on node {socket.gethostname()}: "
                         "start it in a folder that every node sees (a shared file system), as --output_dir must be")
    os.chdir(folder)


def _all_ended(control, world_size: int) -> bool:
    deadline = time.monotonic() + ENDING_GRACE_SECONDS
    while len(ray.get(control.endings.remote())) < world_size:
        if time.monotonic() > deadline:
            return False
        time.sleep(STOP_POLL_SECONDS)
    return True


class StopWatcher:
    """Hands a stop that the driver received to the trainer's ``PreemptionCallback``, from a thread of its own."""

    def __init__(self, control):
        self.control = control
        self.target: PreemptionCallback | None = None  # set once the recipe's trainer exists
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ray-train-stops", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.wait(STOP_POLL_SECONDS):
            signum = ray.get(self.control.stop_signal.remote())
            # Handed on at every poll: the trainer forgets an earlier stop when its training begins.
            if signum is not None and self.target is not None:
                self.target.request_stop(signum)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


class RayTrainCallback(TrainerCallback):
    """Reports each checkpoint to Ray Train once it is complete, saves one when a node of the run is being drained;
    the trainer's stops come from ``stops``."""

    def __init__(self, trainer, stops: StopWatcher):
        preemption = find_callback(trainer, PreemptionCallback)
        preemption.stops_from = "ray_train.py's driver"
        stops.target = preemption
        self._next_drain_check = 0.0
        self._saved_for_drain = False

    def on_step_end(self, args, state, control, **kwargs):
        # A node of the run is being drained (a spot instance reclaimed, a scale-down): save now and go on; once
        # the node is gone Ray restarts the group, which resumes from this checkpoint. Ray's question is a
        # collective of its own (10 ms measured), so it is asked every DRAIN_CHECK_SECONDS by rank 0's clock,
        # which one all-reduce makes every worker's.
        due = state.is_world_process_zero and time.monotonic() >= self._next_drain_check
        if self._saved_for_drain or not any_process(due, args.device):
            return
        self._next_drain_check = time.monotonic() + DRAIN_CHECK_SECONDS
        drain = ray.train.get_preemption_info()
        if drain is not None:
            self._saved_for_drain = True
            control.should_save = True
            logger.warning("Ray reports a node of this run being drained (ranks %s): saving a checkpoint at step %d "
                           "and going on; Ray restarts the group from it once the node is gone",
                           drain.preempted_ranks, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        # on_save follows the checkpoint's publishing on every process; every worker must report, rank 0 the folder.
        name = checkpoint_name(state.global_step)
        folder = Checkpoint.from_directory(os.path.abspath(os.path.join(args.output_dir, name)))
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        metrics = {"step": state.global_step, "epoch": state.epoch, **({"loss": losses[-1]} if losses else {})}
        ray.train.report(metrics, checkpoint=folder if state.is_world_process_zero else None,
                         checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

