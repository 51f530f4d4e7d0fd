"""The Trainer the three scripts share, and the train / evaluate steps that write the results files."""

import logging

from transformers import Trainer

from .callbacks import default_callbacks
from .metrics import TokenAccuracy, perplexity
from .reporting import add_training_speed, write_model_card
from .throughput import ThroughputCallback

logger = logging.getLogger(__name__)


class LMTrainer(Trainer):
    """transformers' Trainer with streaming token accuracy and perplexity in every evaluation.

    Accuracy is counted batch by batch (``batch_eval_metrics``) from argmax predictions, so no
    logits are collected and evaluation memory does not grow with the evaluation set.
    """

    def __init__(self, *args, accuracy: TokenAccuracy, **kwargs):
        kwargs["args"].batch_eval_metrics = True
        kwargs["args"].prediction_loss_only = False
        super().__init__(*args, compute_metrics=accuracy, preprocess_logits_for_metrics=accuracy.preprocess_logits,
                         **kwargs)
        self.accuracy = accuracy
        for callback in default_callbacks(self.args):
            self.add_callback(callback)
        self.throughput = ThroughputCallback(self.args.fps_warmup_steps)
        self.add_callback(self.throughput)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        add_training_speed(self, logs)  # tokens/s beside loss and lr, for the progress bar and TensorBoard
        super().log(logs, start_time)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.accuracy.reset()  # an interrupted earlier evaluation must not leak its counts
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


def train_and_save(trainer: Trainer, checkpoint: str | None, n_samples: int | None,
                   tokens_per_sample: float | None) -> dict:
    """Train (resuming from ``checkpoint``), save the model, and write train_results.json."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # the tokenizer and config are saved with it
    metrics = dict(result.metrics)
    if n_samples is not None:
        metrics["train_samples"] = n_samples
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
