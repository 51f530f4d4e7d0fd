"""The Trainer the three scripts share, and the train / evaluate steps that write the results files."""

import logging

from transformers import Trainer

from .amp_trainer import MixedPrecisionMixin
from .checkpoints import save_checkpoint_atomically, save_model_atomically
from .ddp import set_find_unused_parameters
from .metrics import TokenAccuracy, perplexity
from .reliability import reliability_callbacks, stop_reason
from .reporting import ReportCallback, write_model_card
from .throughput import ThroughputCallback

logger = logging.getLogger(__name__)


class LMTrainer(MixedPrecisionMixin, Trainer):
    """transformers' Trainer with streaming token accuracy and perplexity in every evaluation.

    Accuracy is counted batch by batch (``batch_eval_metrics``) from argmax predictions, so no
    logits are collected and evaluation memory does not grow with the evaluation set.

    Every run also gets the suite's callbacks (run report, preemption, non-finite loss, FPS) and
    checkpoints that are complete or absent. ``--fp16``/``--bf16`` run the suite's apex-style
    mixed precision, or apex's amp when installed (``utils/amp_trainer.py``).
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
        # Mean tokens in a training sample (the block size when packed): tokens/s and MFU derive from it.
        self.tokens_per_sample = tokens_per_sample
        self.report = ReportCallback()  # setup block, run_info.json, tokens/s in the training logs
        self.throughput = ThroughputCallback(self.args.fps_warmup_steps)  # fps after the warm-up
        # SIGTERM/SIGINT -> checkpoint and stop; NaN/inf loss -> stop or skip (utils/reliability.py)
        for callback in (self.report, self.throughput, *reliability_callbacks(self.args)):
            self.add_callback(callback)

    checkpoint_staging: str | None = None  # set while a checkpoint is being written (utils/checkpoints.py)

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer's own saving, into a staging folder renamed once complete: a kill during a
        # save never leaves a half-written checkpoint-N.
        save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)

    def _get_output_dir(self, trial) -> str:
        return self.checkpoint_staging or super()._get_output_dir(trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # tokens/s beside loss and lr, for the progress bar and TensorBoard
            logs.update(self.report.speed_since_last_log(self.args, self.state, self.tokens_per_sample))
        super().log(logs, start_time)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.accuracy.reset()  # an interrupted earlier evaluation must not leak its counts
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


def train_and_save(trainer: LMTrainer, checkpoint: str | None, n_samples: int | None) -> dict:
    """Train (resuming from ``checkpoint``), save the model, and write train_results.json."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stopped = stop_reason(trainer)  # preempted, or a non-finite loss: the checkpoints hold the work
    if stopped is not None:
        raise stopped  # no final model or results that would look like a finished run
    save_model_atomically(trainer)  # the tokenizer and config are saved with it
    metrics = dict(result.metrics)
    if n_samples is not None:
        metrics["train_samples"] = n_samples
    tokens_per_sample = trainer.tokens_per_sample
    if tokens_per_sample and "train_samples_per_second" in metrics:
        metrics["train_tokens_per_second"] = round(metrics["train_samples_per_second"] * tokens_per_sample, 3)
    metrics.update(trainer.throughput.metrics(trainer.args, trainer.model, tokens_per_sample))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    write_model_card(trainer)
    return metrics


def evaluate_and_save(trainer: Trainer, n_samples: int | None) -> dict:
    """Evaluate and write eval_results.json with loss, perplexity and accuracy."""
    metrics = trainer.evaluate()
    # The Hugging Face examples report perplexity without the eval_ prefix.
    metrics["perplexity"] = metrics.pop("eval_perplexity", perplexity(metrics["eval_loss"]))
    if n_samples is not None:
        metrics["eval_samples"] = n_samples
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    write_model_card(trainer)  # now with the evaluation metrics too
    return metrics
