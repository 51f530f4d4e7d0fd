"""A recipe's last step: train, save, evaluate, and write the results files, doing only what is left."""

from __future__ import annotations

import logging
import os

from transformers import TrainerState

from utils.data.prepare import num_samples
from utils.files import read_json
from utils.model.metrics import TokenAccuracy, perplexity
from utils.report.results import write_model_card
from utils.report.run_info import write_run_info
from utils.runs.folder import RunFolder
from utils.runs.record import EVALUATED, TRAINED, TRAINING
from utils.train.checkpointing import save_model_atomically
from utils.train.failures import run_guard
from utils.train.loss_tally import saved_mean_loss
from utils.train.stops import stop_after_training, stop_reason
from utils.train.trainer import LMTrainer

logger = logging.getLogger(__name__)


def train_and_evaluate(model, tokenizer, training_args, samples: dict, run: RunFolder, *, collator,
                       accuracy: TokenAccuracy, tokens_per_sample: float | None,
                       packed_documents: bool = False) -> dict:
    """An LMTrainer on the prepared samples, then --do_train and --do_eval; the run is then finished.

    What the objective decides is given: the collator, the accuracy and the mean tokens in a
    training sample; ``packed_documents``: the samples are packed documents (LMTrainer).
    ``run`` (the claimed --output_dir) says what is left to do there. Returns the metrics written
    (train_results.json's, then eval_results.json's), as the scripts' main() does.
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
        run=run,
        packed_documents=packed_documents,
    )
    metrics = {}
    if training_args.do_train:
        metrics.update(train_and_save(trainer, num_samples(samples["train"])))
    if training_args.do_eval:
        metrics.update(evaluate_and_save(trainer, num_samples(samples["eval"])))
    run.finish()
    return metrics


def train_and_save(trainer: LMTrainer, n_samples: int | None) -> dict:
    """Train (resuming where the run folder says), save the model, and write train_results.json."""
    run = trainer.run
    if run is not None and run.training_done:
        return _trained_before(trainer)
    if run is not None:
        run.begin()  # the run's record in --output_dir (claimed); starting over, the old checkpoints go
        run.mark(TRAINING)
    checkpoint = run.checkpoint if run is not None else None
    last = _last_step_state(trainer, checkpoint)
    if last is not None:
        # A stop after the last checkpoint, before the results: only saving and reporting are left.
        logger.info("%s holds the last step (%d): saving its model and results, training no further",
                    checkpoint, last.global_step)
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = last
        metrics = _metrics_of(last)
        if trainer.is_world_process_zero():
            write_run_info(trainer.args.output_dir, trainer.describe_run())  # as a training start writes it
    else:
        with run_guard(trainer):  # unreadable streamed data, a full disk: one line, not a traceback
            result = trainer.train(resume_from_checkpoint=checkpoint)
        stopped = stop_reason(trainer)  # preempted, or a non-finite loss: the checkpoints hold the work
        if stopped is not None:
            raise stopped  # no final model or results that would look like a finished run
        metrics = dict(result.metrics)
        metrics.update(trainer.speed.metrics(trainer.args, trainer.model))
    if n_samples is not None:
        metrics["train_samples"] = n_samples
    with run_guard(trainer):  # a full disk while writing any of these: one line, the rerun saves again
        save_model_atomically(trainer)  # the tokenizer and config are saved with it
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            write_model_card(trainer.args.output_dir)
    if run is not None:
        run.mark(TRAINED)
    stop_after_training(trainer)
    return metrics


def evaluate_and_save(trainer: LMTrainer, n_samples: int | None) -> dict:
    """Evaluate and write eval_results.json with loss, perplexity and accuracy (and for causal LMs the loss per byte
    and per word, utils/eval/), then the reports made from it."""
    stop_after_training(trainer)
    run = trainer.run
    metrics = _evaluated_before(trainer) if run is not None and run.reached(EVALUATED) else None
    if metrics is None:
        if trainer.is_world_process_zero():
            trainer.report.log_setup_once(trainer.args)  # evaluation only: the setup before its progress bar
        with run_guard(trainer):
            metrics = trainer.evaluate()
        # The Hugging Face examples report perplexity without the eval_ prefix.
        metrics["perplexity"] = metrics.pop("eval_perplexity", perplexity(metrics["eval_loss"]))
        if n_samples is not None:
            metrics["eval_samples"] = n_samples
        trainer.log_metrics("eval", metrics)
        with run_guard(trainer):  # a full disk: one line, and the rerun evaluates again
            trainer.save_metrics("eval", metrics)
        if run is not None:
            run.mark(EVALUATED)
    with run_guard(trainer):  # a full disk: one line, and the rerun writes these again
        if trainer.is_world_process_zero():
            # An evaluation-only run started no training to write it.
            write_run_info(trainer.args.output_dir, trainer.describe_run(), overwrite=False)
            write_model_card(trainer.args.output_dir)  # now with the evaluation metrics too
    return metrics


def _last_step_state(trainer: LMTrainer, checkpoint: str | None) -> TrainerState | None:
    """The checkpoint's Trainer state when it was saved at the run's last step, else None."""
    if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        return None
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    target = trainer.args.max_steps if trainer.args.max_steps > 0 else state.max_steps
    return state if target and state.global_step >= target else None


def _metrics_of(state: TrainerState) -> dict:
    """train_results.json's figures for a run that trained to its end before this start.

    The mean training loss is the one the checkpoint carries (utils/train/loss_tally.py); there is no
    speed to report for a run that took no step now.
    """
    metrics = {"epoch": state.epoch, "total_flos": state.total_flos}
    mean = saved_mean_loss(state)
    if mean is None:
        logger.warning("The checkpoint carries no training loss sum: train_results.json has no train_loss")
    else:
        metrics["train_loss"] = mean
    return metrics


def _trained_before(trainer: LMTrainer) -> dict:
    """A rerun whose training was done before: load that final model (to evaluate it) and its results."""
    output_dir = trainer.args.output_dir
    logger.info("Training is done in %s: loading its final model, evaluating only", output_dir)
    trainer._load_from_checkpoint(output_dir)
    return read_json(os.path.join(output_dir, "train_results.json"))


def _evaluated_before(trainer: LMTrainer) -> dict | None:
    """A rerun whose evaluation was done before (a stop while its reports were written): those results."""
    path = os.path.join(trainer.args.output_dir, "eval_results.json")
    metrics = read_json(path)
    if metrics is None:
        logger.warning("%s is gone: evaluating again", path)
        return None
    logger.info("Evaluation is done in %s: reporting its results, evaluating no further", trainer.args.output_dir)
    trainer.log_metrics("eval", metrics)
    return metrics
