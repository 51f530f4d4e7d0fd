"""The Trainer the three scripts share, and the train / evaluate steps that write the results files."""

import json
import logging
import os

from transformers import Trainer

from . import run_folder
from .amp_trainer import MixedPrecisionMixin, ScaleFloorCallback
from .checkpoints import AtomicCheckpointsMixin, begin_run, newest_complete_checkpoint, save_model_atomically
from .chunked_loss import ChunkedLossMixin
from .data import num_samples
from .ddp import set_find_unused_parameters
from .device import device_name
from .errors import TrainingStopped
from .failures import run_guard
from .metrics import TokenAccuracy, perplexity
from .loss_scaler import FLOOR_PATIENCE
from .modeling import weigh_loss_by_num_items
from .reliability import (EXIT_NONFINITE_LOSS, NonFiniteLossCallback, PreemptionCallback, SignalSafeLoadersMixin,
                          find_callback, reliability_callbacks)
from .reporting import ReportCallback, write_run_info
from .results import write_model_card
from .scaling import setup_sharding
from .speed import SpeedCallback

logger = logging.getLogger(__name__)


class LMTrainer(AtomicCheckpointsMixin, SignalSafeLoadersMixin, MixedPrecisionMixin, ChunkedLossMixin, Trainer):
    """transformers' Trainer with streaming token accuracy and perplexity in every evaluation.

    Accuracy is counted batch by batch (``batch_eval_metrics``) from argmax predictions, so no
    logits are collected and evaluation memory does not grow with the evaluation set.

    Every run also gets the suite's callbacks (run report, preemption, non-finite loss, FPS) and
    checkpoints that are complete or absent. ``--fp16``/``--bf16`` run the suite's apex-style
    mixed precision, or apex's amp when installed (``utils/amp_trainer.py``); ``--loss_chunk_size``
    computes the output layer and the loss in chunks (``utils/chunked_loss.py``).
    """

    def __init__(self, *args, accuracy: TokenAccuracy, tokens_per_sample: float | None = None, **kwargs):
        kwargs["args"].batch_eval_metrics = True
        kwargs["args"].prediction_loss_only = False
        set_find_unused_parameters(kwargs["args"], kwargs.get("model"), kwargs.get("data_collator"),
                                   kwargs.get("train_dataset"))  # before the Trainer sets up DDP
        if kwargs["args"].device.type == "cpu":
            # Pinned memory only speeds up copies to an accelerator; on the CPU torch just warns.
            kwargs["args"].dataloader_pin_memory = False
        super().__init__(*args, compute_metrics=accuracy, preprocess_logits_for_metrics=accuracy.preprocess_logits,
                         **kwargs)
        self.accuracy = accuracy
        self.setup_chunked_loss(shift=accuracy.shift)  # --loss_chunk_size (utils/chunked_loss.py)
        if self.model_accepts_loss_kwargs:  # the Trainer then leaves gradient accumulation to the model's loss
            weigh_loss_by_num_items(self.model)
        # tokens_per_sample: mean tokens in a training sample (the block size when packed), for tokens/s and MFU.
        self.speed = SpeedCallback(self.args.fps_warmup_steps, tokens_per_sample, device_name(self.args.device.type))
        # SIGTERM/SIGINT -> checkpoint and stop; NaN/inf loss -> stop or skip (utils/reliability.py)
        for callback in (ReportCallback(), self.speed, *reliability_callbacks(self.args)):
            self.add_callback(callback)
        setup_sharding(self)  # --fsdp on CPU processes too, and what each process holds (utils/scaling.py)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # tokens/s beside loss and lr, for the progress bar and TensorBoard
            logs.update(self.speed.since_last_log(self.args))
        super().log(logs, start_time)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.accuracy.reset()  # an interrupted earlier evaluation must not leak its counts
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


def train_and_evaluate(model, tokenizer, training_args, samples: dict, checkpoint: str | None, *, collator,
                       accuracy: TokenAccuracy, tokens_per_sample: float | None) -> LMTrainer:
    """A recipe's last step: an LMTrainer on the prepared samples, then --do_train and --do_eval.

    What the objective decides is given: the collator, the accuracy and the mean tokens in a
    training sample. Training resumes from ``checkpoint``; each step writes its results files.
    """
    trainer = LMTrainer(
        model=model,
        args=training_args,
        train_dataset=samples.get("train"),
        eval_dataset=samples.get("eval"),
        processing_class=tokenizer,
        data_collator=collator,
        accuracy=accuracy,
        tokens_per_sample=tokens_per_sample,
    )
    if training_args.do_train:
        train_and_save(trainer, checkpoint, num_samples(samples["train"]))
    if training_args.do_eval:
        evaluate_and_save(trainer, num_samples(samples["eval"]))
    return trainer


def train_and_save(trainer: LMTrainer, checkpoint: str | None, n_samples: int | None) -> dict:
    """Train (resuming from ``checkpoint``), save the model, and write train_results.json."""
    if run_folder.training_done(trainer.args.output_dir):
        return _trained_before(trainer)
    begin_run()  # the run's record in --output_dir; starting over, the old checkpoints go
    with run_guard(trainer):  # unreadable streamed data, a full disk: one line, not a traceback
        result = trainer.train(resume_from_checkpoint=checkpoint)
    stopped = stop_reason(trainer)  # preempted, or a non-finite loss: the checkpoints hold the work
    if stopped is not None:
        raise stopped  # no final model or results that would look like a finished run
    with run_guard(trainer):
        save_model_atomically(trainer)  # the tokenizer and config are saved with it
    metrics = dict(result.metrics)
    if n_samples is not None:
        metrics["train_samples"] = n_samples
    metrics.update(trainer.speed.metrics(trainer.args, trainer.model))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_model_card(trainer.args.output_dir)
    run_folder.mark(run_folder.TRAINED)
    stop_after_training(trainer)
    return metrics


def evaluate_and_save(trainer: Trainer, n_samples: int | None) -> dict:
    """Evaluate and write eval_results.json with loss, perplexity and accuracy."""
    stop_after_training(trainer)
    with run_guard(trainer):
        metrics = trainer.evaluate()
    # The Hugging Face examples report perplexity without the eval_ prefix.
    metrics["perplexity"] = metrics.pop("eval_perplexity", perplexity(metrics["eval_loss"]))
    if n_samples is not None:
        metrics["eval_samples"] = n_samples
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        write_run_info(trainer.args, overwrite=False)  # an evaluation-only run started no training to write it
        write_model_card(trainer.args.output_dir)  # now with the evaluation metrics too
    return metrics


def _trained_before(trainer: LMTrainer) -> dict:
    """A rerun whose training was done before: load that final model (to evaluate it) and its results."""
    output_dir = trainer.args.output_dir
    logger.info("Training is done in %s: loading its final model, evaluating only", output_dir)
    trainer._load_from_checkpoint(output_dir)
    with open(os.path.join(output_dir, "train_results.json"), encoding="utf-8") as f:
        return json.load(f)


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
            f"error: fp16 gradients overflowed at the minimum loss scale {trainer.amp_config.min_loss_scale:g} for "
            f"{FLOOR_PATIENCE} steps in a row, up to step {floor.stopped_at}: training stopped without saving those "
            f"steps; {_kept(output_dir)}. Try --bf16, a lower --learning_rate or --max_grad_norm 1.0",
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
