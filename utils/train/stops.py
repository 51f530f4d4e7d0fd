"""Runs that stop early without losing work: preemption signals and non-finite losses.

* ``PreemptionCallback``: on SIGTERM or SIGINT (what schedulers send before a kill, and Ctrl+C)
  the current optimizer step is finished, a checkpoint is written and training stops; the
  script then exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT)
  without saving a final model or evaluating. Running the same command again resumes from
  that checkpoint. A second SIGINT (Ctrl+C again, a second or more after the first) stops at
  once, without a checkpoint. A repeated SIGTERM is the same stop: schedulers signal every process
  and each layer under them (slurmstepd, srun, torchrun) passes its own on, so the save goes on
  until done, or until the scheduler's SIGKILL. A signal that comes
  after the last step is kept (``signal_after_training``): the script then writes the final
  model and stops before evaluating. Once a stop checkpoint is written, further signals are
  ignored: all that is left is to say so and exit (torchrun's own shutdown signal must not cut
  that short).
  Before training begins, a signal stops the script at once with its own ``stopped:`` line
  (utils/launch/signals.py); ``PreemptionCallback`` takes the signals over from there.
* ``workers_ignore_stops``: DataLoader workers ignore SIGTERM and SIGINT. Terminals, ``timeout``,
  Slurm, systemd and Kubernetes signal the workers too (a process group, or every process);
  the training process alone decides, checkpoints, and then ends its workers itself.
* ``NonFiniteLossCallback``: a NaN/inf training loss drops that step's update. With
  ``--on_nonfinite_loss stop`` (default) training stops without saving the bad step, and the
  script exits with status 3 naming the step; with ``skip`` training goes on. Off under fp16
  with dynamic loss scaling, whose scaler already skips overflowing steps.

Under torchrun every process decides with the others (a one-number all-reduce per step,
only when distributed), so all stop after the same step even if one process got the signal.
Why a run stopped, in one line and an exit status, is ``stop_reason`` (after training) and
``stop_after_training`` (a signal during the final save).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from transformers import TrainerCallback

from utils.dist import any_process
from utils.errors import TrainingStopped
from utils.amp.scaler import FLOOR_PATIENCE
from utils.launch.signals import STOP_SIGNALS, training_begins
from utils.runs.checkpoints import newest_complete_checkpoint
from utils.train.precision import ScaleFloorCallback

logger = logging.getLogger(__name__)

EXIT_NONFINITE_LOSS = 3
SAME_STOP_SECONDS = 1.0  # a repeat within this time is the same stop, not a second signal


# ---------------------------------------------------------------------------- preemption


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGINT: finish the step, save a checkpoint, stop training (see the module doc)."""

    def __init__(self):
        self.received: int | None = None  # set by the signal handler, read between steps
        self.stopped_at: int | None = None  # the step whose checkpoint was written on the way out
        self.stops_from: str | None = None  # who calls request_stop where no signal handler can be set
        self._previous_handlers: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_at = None
        training_begins()  # the stop before training hands the signals over
        self._restore_handlers()  # a train() that raised never reached on_train_end
        try:
            for sig in STOP_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # handlers can only be set in the main thread (e.g. not in a notebook worker)
            if self.stops_from is None:
                logger.warning("Not in the main thread: SIGTERM/SIGINT will stop training without a checkpoint")
            else:
                logger.info("Not in the main thread: %s passes stops on", self.stops_from)

    def request_stop(self, signum: int) -> None:
        """Stop as on a first ``signum`` to this process, from any thread: for a launcher that runs the recipe
        in a worker thread, where no signal handler can be set (Ray Train, utils/raytrain/worker.py)."""
        # Only set a flag: the training loop acts on it between steps, where the state is consistent.
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.request_stop(signum)
            return
        if signum == signal.SIGTERM or time.monotonic() - self._received_at < SAME_STOP_SECONDS:
            return  # the same stop, delivered again (to every process by systemd/Slurm, then by torchrun)
        # Ctrl+C again: the user insists. Act as if we had never caught it (no checkpoint).
        self._restore_handlers()
        signal.raise_signal(signum)

    def on_step_end(self, args, state, control, **kwargs):
        if not any_process(self.received is not None, args.device):
            return
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # the scheduler's grace period is better spent saving
        logger.warning("%s received: saving a checkpoint at step %d of %d, then stopping",
                       self.signal_name, state.global_step, state.max_steps)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_save = False  # this step's checkpoint is already written

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None and self._previous_handlers:  # handlers of ours: in the main thread
            # The checkpoint is written; nothing is left but to say so and exit.
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        # Otherwise the handlers stay: a signal during the final save or evaluation is honoured
        # by the script (signal_after_training), not lost and not a kill in mid-write.

    def signal_after_training(self, args) -> bool:
        """True (on every process) when a signal came after the last step's check."""
        return any_process(self.received is not None and self.stopped_at is None, args.device)

    def _restore_handlers(self):
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "SIGTERM/SIGINT (sent to another process)"

    @property
    def exit_status(self) -> int:
        return 128 + (self.received or signal.SIGTERM)


# ---------------------------------------------------------------------------- non-finite loss


def drop_update(model, optimizer) -> None:
    """Make the coming optimizer step a no-op: torch optimizers leave params without a grad alone."""
    if hasattr(optimizer, "drop_update"):  # mixed precision: its grads are flat or shared buffers, kept in place
        optimizer.drop_update()
        return
    params = list(model.parameters()) if model is not None else []
    if optimizer is not None:
        # The optimizer may step other tensors than the model's (fp32 masters under mixed precision).
        params += [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = None


class NonFiniteLossCallback(TrainerCallback):
    """Watches the training loss; on NaN/inf drops the step's update, then stops or skips.

    The loss is the one training computes (chunked or not), as ``tally`` (utils/train/loss_tally.py)
    saw each micro-batch's; its verdict is looked at once per optimizer step, in
    ``on_pre_optimizer_step``. On CPU that is free. On a GPU/NPU it is one sync per
    optimizer step; the Trainer's default ``--logging_nan_inf_filter`` already syncs on the
    loss of every micro-batch, so it adds nothing noticeable there. ``scaler_skips``: the run's
    loss scaler skips such steps itself (fp16 with a dynamic scale), and this one stays idle.
    """

    def __init__(self, tally, policy: str = "stop", scaler_skips: bool = False):
        self.tally = tally
        self.policy = policy
        self.scaler_skips = scaler_skips
        self.bad_step: int | None = None  # the step that stopped training (policy stop)
        self.skipped_steps: list[int] = []  # steps whose update was skipped (policy skip)

    def on_train_begin(self, args, state, control, **kwargs):
        self.bad_step, self.skipped_steps = None, []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.scaler_skips or not self.tally.step_is_bad(args.device):
            return
        step = state.global_step + 1  # global_step counts finished steps
        drop_update(model, optimizer)
        if self.policy == "skip":
            self.skipped_steps.append(step)
            logger.warning("Non-finite loss at step %d: its update was skipped (--on_nonfinite_loss skip)", step)
        else:
            self.bad_step = step
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            control.should_save = False  # never checkpoint the step that went wrong
            control.should_evaluate = False

    on_epoch_end = on_step_end


# ---------------------------------------------------------------------------- loaders


class _IgnoreStops:
    """A DataLoader ``worker_init_fn``: ignore SIGTERM and SIGINT, then the original one (a class, so it pickles).

    torch's own SIGTERM handler in a worker dies of a signal its parent did not send, and the
    training process then fails with "DataLoader worker ... is killed by signal". Ignoring them, a
    worker ends when its parent shuts the loader down, or when its parent is gone.
    """

    def __init__(self, then):
        self.then = then

    def __call__(self, worker_id):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def workers_ignore_stops(loader):
    """The Trainer's DataLoader, its workers deaf to SIGTERM and SIGINT (see the module doc)."""
    # accelerate's prepared loader forwards reads to the DataLoader it wraps, which starts the workers,
    # but keeps an attribute set on itself: set it on the wrapped one.
    starts_workers = getattr(loader, "base_dataloader", loader)
    if getattr(starts_workers, "num_workers", 0) > 0 and not isinstance(starts_workers.worker_init_fn, _IgnoreStops):
        starts_workers.worker_init_fn = _IgnoreStops(starts_workers.worker_init_fn)
    return loader


def find_callback(trainer, kind):
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)), None)


# ---------------------------------------------------------------------------- why it stopped


def stop_reason(trainer) -> TrainingStopped | None:
    """Why ``trainer.train()`` stopped before the end (preempted, non-finite loss), if it did."""
    output_dir = trainer.args.output_dir
    preemption = find_callback(trainer, PreemptionCallback)
    if preemption is not None and preemption.stopped_at is not None:
        return TrainingStopped(
            f"stopped: {preemption.signal_name} received; saved {output_dir}/checkpoint-{preemption.stopped_at} "
            f"at step {preemption.stopped_at} of {trainer.state.max_steps}, no final model or evaluation; "
            f"run the same command to resume (exit status {preemption.exit_status})",
            preemption.exit_status,
        )
    guard = find_callback(trainer, NonFiniteLossCallback)
    if guard is not None and guard.bad_step is not None:
        return TrainingStopped(
            f"error: non-finite loss (NaN or inf) at step {guard.bad_step}: training stopped without saving "
            f"that step; {_kept(output_dir)}. Lower --learning_rate, check the data, or pass --on_nonfinite_loss skip",
            EXIT_NONFINITE_LOSS,
        )
    floor = find_callback(trainer, ScaleFloorCallback)
    if floor is not None and floor.stopped_at is not None:
        return TrainingStopped(
            f"error: fp16 gradients overflowed at the minimum loss scale {floor.precision.config.min_loss_scale:g} "
            f"for {FLOOR_PATIENCE} steps in a row, up to step {floor.stopped_at}: training stopped without saving "
            f"those steps; {_kept(output_dir)}. Try --bf16, a lower --learning_rate or --max_grad_norm 1.0",
            EXIT_NONFINITE_LOSS,
        )
    return None


def _kept(output_dir: str) -> str:
    last = newest_complete_checkpoint(output_dir, quiet=True) if os.path.isdir(output_dir) else None
    return f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"


def stop_after_training(trainer) -> None:
    """A SIGTERM/SIGINT after the last step: stop before evaluating, the final model being saved."""
    preemption = find_callback(trainer, PreemptionCallback)
    if preemption is None or not preemption.signal_after_training(trainer.args):
        return
    raise TrainingStopped(
        f"stopped: {preemption.signal_name} received after the last training step; the final model and train "
        f"results are saved in {trainer.args.output_dir}, the evaluation was not run; run the same command to "
        f"evaluate (exit status {preemption.exit_status})",
        preemption.exit_status,
    )
