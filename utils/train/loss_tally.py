"""The training loss as reported: the loss training computed, over the steps that were taken.

The Trainer sums every micro-batch's loss into ``_tr_loss``; a non-finite one it replaces by the
mean of the steps since the last log (``--logging_nan_inf_filter``), which is 0.0 for the first
step after a log, and counts that step into the logged loss and the run's mean ``train_loss``.
Such a step's update is never applied (the guard in utils/train/stops.py drops it, or the fp16
scaler skips it), so here:

* every micro-batch's loss passes ``observe`` (``LMTrainer.training_step``): a non-finite one
  marks its optimizer step bad and adds nothing; it is the loss training computes, chunked
  (``--loss_chunk_size``) or not, in every precision, so the guard reads its verdict here too;
* at the step's end a bad step's finite micro-batch losses are taken out again and the step is
  counted as skipped (one all-reduce when distributed, so every process agrees);
* a log's loss is the mean over its steps that were not skipped, with ``skipped_steps`` beside it;
  a log with only skipped steps has no loss;
* ``train_loss`` is the mean over all steps not skipped, those of earlier attempts too: the sum
  and the counts travel in every checkpoint (``trainer_state.json``) and come back on resume.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from utils.dist import any_process

logger = logging.getLogger(__name__)

STATE_KEY = "LossTally"  # its entry in trainer_state.json's stateful_callbacks


class LossTally(TrainerCallback):
    """Keeps non-finite steps out of the logged and the mean training loss (see the module doc)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._reset_run(0.0, 0, 0)

    def _reset_run(self, earlier_sum: float, earlier_steps: int, skipped: int) -> None:
        self.earlier_sum, self.earlier_steps, self.skipped = earlier_sum, earlier_steps, skipped
        self.log_steps = self.log_skipped = 0
        self._reset_step()

    def _reset_step(self) -> None:
        self._bad = None  # device bool: a non-finite micro-batch loss in this optimizer step
        self._step_sum = None  # the finite micro-batch losses added to the Trainer's sum in this step
        self._verdict = None

    def on_train_begin(self, args, state, control, **kwargs):
        saved = _saved_tally(state)
        if saved:  # resumed: what the steps before gave
            self._reset_run(float(saved["loss_sum"]), int(saved["steps"]), int(saved["skipped"]))
        else:
            self._reset_run(0.0, state.global_step, 0)
            if state.global_step:
                logger.warning("The checkpoint carries no training loss sum: train_loss will cover the steps "
                               "from %d on only", state.global_step)

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss as the Trainer should add it: 0 when non-finite (no sync here)."""
        finite = torch.isfinite(loss).all()
        self._bad = ~finite if self._bad is None else self._bad | ~finite
        kept = torch.where(finite, loss, torch.zeros_like(loss))
        self._step_sum = kept if self._step_sum is None else self._step_sum + kept
        return kept

    def step_is_bad(self, device) -> bool:
        """Whether this optimizer step saw a non-finite loss on any process (decided once per step)."""
        if self._verdict is None:
            self._verdict = any_process(self._bad is not None and bool(self._bad.item()), device)
        return self._verdict

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_is_bad(args.device):
            self.trainer._tr_loss -= self._step_sum
            self.skipped += 1
            self.log_skipped += 1
        self.log_steps += 1
        self._reset_step()

    def fix_log(self, logs: dict) -> None:
        """A log's loss over its steps that were not skipped (the Trainer divided by all of them)."""
        taken = self.log_steps - self.log_skipped
        if self.log_skipped:
            logs["skipped_steps"] = self.log_skipped
            if taken:
                logs["loss"] = logs["loss"] * self.log_steps / taken
            else:
                del logs["loss"]  # nothing was trained since the last log: no loss to show
        self.log_steps = self.log_skipped = 0

    def _run_sum(self, undrained: float) -> float:
        return self.earlier_sum + self.trainer._total_loss_scalar + undrained

    def checkpoint_state(self) -> dict:
        """What a checkpoint carries (every process calls it: the undrained sum is averaged over them)."""
        tr_loss = self.trainer._tr_loss
        undrained = nested_gather(tr_loss.detach().clone(), self.trainer.args.parallel_mode).mean().item()
        return {"loss_sum": self._run_sum(undrained), "steps": self.trainer.state.global_step,
                "skipped": self.skipped}

    def mean_train_loss(self) -> float:
        """After training: the mean loss of the steps taken, over this run and the attempts it resumed."""
        taken = self.trainer.state.global_step - self.skipped
        return self._run_sum(0.0) / taken if taken > 0 else float("nan")


def saved_mean_loss(state) -> float | None:
    """The mean training loss a checkpoint's Trainer state carries (None if it carries no loss sum)."""
    saved = _saved_tally(state)
    if not saved:
        return None
    taken = int(saved["steps"]) - int(saved["skipped"])
    return float(saved["loss_sum"]) / taken if taken > 0 else float("nan")


def _saved_tally(state) -> dict | None:
    """The tally a Trainer state carries, if it was saved at that state's step."""
    saved = (state.stateful_callbacks or {}).get(STATE_KEY)
    return saved if saved and saved.get("steps") == state.global_step else None
