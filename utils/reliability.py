"""Runs that stop early without losing work: preemption signals and non-finite losses.

* ``PreemptionCallback``: on SIGTERM or SIGINT (what schedulers send before a kill, and Ctrl+C)
  the current optimizer step is finished, a checkpoint is written and training stops; the
  script then exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT)
  without saving a final model or evaluating. Running the same command again resumes from
  that checkpoint. A second signal (a second or more after the first) stops at once, without a
  checkpoint. A signal that comes
  after the last step is kept (``signal_after_training``): the script then writes the final
  model and stops before evaluating. Once a stop checkpoint is written, further signals are
  ignored: all that is left is to say so and exit (torchrun's own shutdown signal must not cut
  that short).
* ``SignalSafeLoadersMixin``: DataLoader workers leave the process group, so that a Ctrl+C or a
  SIGTERM to the whole group (terminals, ``timeout``, Slurm) reaches the training process only,
  which then checkpoints, instead of killing the workers it needs for the rest of the step.
* ``NonFiniteLossCallback``: a NaN/inf training loss drops that step's update. With
  ``--on_nonfinite_loss stop`` (default) training stops without saving the bad step, and the
  script exits with status 3 naming the step; with ``skip`` training goes on. Off under fp16
  with dynamic loss scaling, whose scaler already skips overflowing steps.

Under torchrun every process decides with the others (a one-number all-reduce per step,
only when distributed), so all stop after the same step even if one process got the signal.
(Why a run stopped, in one line, is ``utils.trainer.stop_reason``.)
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
from transformers import TrainerCallback

from .amp_config import amp_config_from_args
from .ddp import any_process

logger = logging.getLogger(__name__)

EXIT_NONFINITE_LOSS = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_STOP_SECONDS = 1.0  # a repeat within this time is the same stop, not a second signal


# ---------------------------------------------------------------------------- preemption


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGINT: finish the step, save a checkpoint, stop training (see the module doc)."""

    def __init__(self):
        self.received: int | None = None  # set by the signal handler, read between steps
        self.stopped_at: int | None = None  # the step whose checkpoint was written on the way out
        self._previous_handlers: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_at = None
        self._restore_handlers()  # a train() that raised never reached on_train_end
        try:
            for sig in STOP_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # handlers can only be set in the main thread (e.g. not in a notebook worker)
            logger.warning("Not in the main thread: SIGTERM/SIGINT will stop training without a checkpoint")

    def _on_signal(self, signum, frame):
        # Only set a flag: the training loop acts on it between steps, where the state is consistent.
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
            return
        if time.monotonic() - self._received_at < SAME_STOP_SECONDS:
            return  # the same stop, delivered twice (to every process by systemd/Slurm, then by torchrun)
        # A second signal: the sender insists. Act as if we had never caught it (no checkpoint).
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
        if self.stopped_at is not None:
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


def scaler_skips_overflows(args) -> bool:
    """fp16 with dynamic loss scaling skips inf/NaN steps itself; the precision config says when (not at O0)."""
    config = amp_config_from_args(args)
    return config is not None and config.skips_overflowing_steps


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

    The loss is read from the model's output by a forward hook (so no Trainer method is
    overridden) and kept on the device; it is looked at once per optimizer step, in
    ``on_pre_optimizer_step``. On CPU that is free. On a GPU/NPU it is one sync per
    optimizer step; the Trainer's default ``--logging_nan_inf_filter`` already syncs on the
    loss of every micro-batch, so it adds nothing noticeable there.
    """

    def __init__(self, policy: str = "stop"):
        self.policy = policy
        self.bad_step: int | None = None  # the step that stopped training (policy stop)
        self.skipped_steps: list[int] = []  # steps whose update was skipped (policy skip)
        self._nonfinite = None  # device bool: a non-finite loss since the last optimizer step
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.bad_step, self.skipped_steps, self._nonfinite = None, [], None
        if model is not None and self._hook is None and not scaler_skips_overflows(args):
            self._hook = model.register_forward_hook(self._observe)

    def _observe(self, module, inputs, outputs):
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if module.training and isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no sync here
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._hook is None:
            return
        bad = self._nonfinite is not None and bool(self._nonfinite.item())
        self._nonfinite = None
        if not any_process(bad, args.device):
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

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# ---------------------------------------------------------------------------- loaders


class SignalSafeLoadersMixin:
    """Trainer mixin: DataLoader workers in a process group of their own (see the module doc).

    The Trainer still ends them itself when a loader is done; only signals meant for the
    whole group no longer reach them.
    """

    def get_train_dataloader(self):
        return _workers_in_own_group(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return _workers_in_own_group(super().get_eval_dataloader(eval_dataset))


class _LeaveProcessGroup:
    """A DataLoader ``worker_init_fn``: setpgid, then the original one (a class, so it pickles)."""

    def __init__(self, then):
        self.then = then

    def __call__(self, worker_id):
        os.setpgid(0, 0)
        if self.then is not None:
            self.then(worker_id)


def _workers_in_own_group(loader):
    if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, _LeaveProcessGroup):
        loader.worker_init_fn = _LeaveProcessGroup(loader.worker_init_fn)
    return loader


def find_callback(trainer, kind):
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)), None)


def reliability_callbacks(args) -> list[TrainerCallback]:
    """The callbacks every run gets from this module."""
    return [PreemptionCallback(), NonFiniteLossCallback(getattr(args, "on_nonfinite_loss", "stop"))]
