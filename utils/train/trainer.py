"""The Trainer the three scripts share: every change to transformers' Trainer is in ``LMTrainer``."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

from transformers import Trainer, TrainerCallback

from utils.amp.config import precision_report
from utils.amp.optimizer import implementation
from utils.eval.loss_sum import TokenLossSum
from utils.eval.windows import ScoredWindows
from utils.launch.ddp import set_find_unused_parameters
from utils.launch.device import device_name
from utils.model.chunked_loss import ChunkedLoss, hidden_states_out, loss_chunk_size
from utils.model.liger import check_liger
from utils.model.loss import weigh_loss_by_num_items
from utils.model.labelled_positions import LabelledPositions
from utils.model.metrics import TokenAccuracy, perplexity
from utils.model.vocab_padding import VocabPadding
from utils.report.results import save_results
from utils.report.run_info import ReportCallback, run_info
from utils.report.speed import SpeedCallback
from utils.runs.folder import RunFolder
from utils.train.checkpointing import save_checkpoint
from utils.train.loss_tally import STATE_KEY, LossTally
from utils.train.precision import MixedPrecision, fit_npu_fused_optimizer
from utils.train.sharding import setup_sharding
from utils.train.stops import NonFiniteLossCallback, PreemptionCallback, workers_ignore_stops

logger = logging.getLogger(__name__)

# What the launcher running this process adds to every LMTrainer: callbacks, each made from the trainer
# (utils/raytrain/worker.py: checkpoints reported to Ray Train, and its stops passed on).
LAUNCHER_CALLBACKS: list[Callable[[Trainer], TrainerCallback]] = []


class LMTrainer(Trainer):
    """transformers' Trainer with the suite's mixed precision, checkpoints, stops, speed and metrics.

    Each Trainer method changed here does one thing and hands it to the module that answers it:

    ==============================  ===========================================  ==============================
    Trainer method                  what changes                                 answered by
    ==============================  ===========================================  ==============================
    ``__init__``                    DDP's unused-parameter probe; the callbacks; utils/launch/ddp.py, below,
                                    --use_liger_kernel off where it does nothing utils/model/liger.py
    ``create_optimizer``            mixed precision wraps the optimizer          utils/train/precision.py
    ``accelerator.backward``        (replaced) the fp16 loss scale, our all-     utils/train/precision.py
                                    reduce of flat buffers under DDP
    ``autocast_smart_context_...``  the O-level's forward context                utils/train/precision.py
    ``_clip_grad_norm``,            unscaled master grads                        utils/train/precision.py
    ``_get_grad_norm``
    ``_save``                       fp32 weights from the masters; the true      utils/train/precision.py,
                                    vocabulary of a padded one                   utils/model/vocab_padding.py
    ``compute_loss``                the head at the labelled positions only;     utils/model/labelled_positions.py
                                    ``--loss_chunk_size``;                       utils/model/chunked_loss.py,
                                    the eval loss summed token by token          utils/eval/loss_sum.py
    ``training_step``, ``train``    non-finite steps out of the reported loss    utils/train/loss_tally.py
    ``log``                         tokens/s, loss scale beside the loss         utils/report/speed.py
    ``evaluation_loop``             streaming accuracy, perplexity;              utils/model/metrics.py,
                                    bits per byte, byte and word perplexity      utils/eval/windows.py
    ``get_train_dataloader``,       loader workers ignore SIGTERM and SIGINT     utils/train/stops.py
    ``get_eval_dataloader``
    ``_get_output_dir``,            complete-or-absent checkpoints               utils/train/checkpointing.py
    ``_save_checkpoint``
    ``save_metrics``                results files written whole                  utils/report/results.py
    ==============================  ===========================================  ==============================

    Callbacks every run gets: ``ReportCallback`` (run_info.json, utils/report/run_info.py),
    ``SpeedCallback`` (FPS, tokens/s, MFU, utils/report/speed.py), ``PreemptionCallback`` and
    ``NonFiniteLossCallback`` (utils/train/stops.py); with fp16, ``ScaleFloorCallback``
    (utils/train/precision.py); with --fsdp, ``ShardingReport`` (utils/train/sharding.py); and those
    of the launcher, ``LAUNCHER_CALLBACKS``.

    Accuracy is counted batch by batch (``batch_eval_metrics``) from argmax predictions, so no
    logits are collected and evaluation memory does not grow with the evaluation set.
    ``run``: the claimed --output_dir (utils/runs/folder.py), whose id every checkpoint carries.

    The eval loss is summed token by token (utils/eval/loss_sum.py) instead of the Trainer's mean
    over samples where samples predict different numbers of tokens: packed documents
    (``packed_documents``, --packing document) and sliding windows (--eval_stride). An evaluation
    set of windows over a token stream (``ScoredWindows``, run_clm.py) knows the text its scored
    tokens cover: the evaluation adds the loss per byte and per word.
    """

    def __init__(self, *args, accuracy: TokenAccuracy, tokens_per_sample: float | None = None,
                 run: RunFolder | None = None, packed_documents: bool = False, **kwargs):
        training_args = kwargs["args"]
        training_args.batch_eval_metrics = True
        check_liger(training_args, kwargs["model"])  # a warning and off where Liger has no kernels for the model
        set_find_unused_parameters(training_args, kwargs.get("model"), kwargs.get("data_collator"),
                                   kwargs.get("train_dataset"))  # before the Trainer sets up DDP
        if training_args.device.type == "cpu":
            # Pinned memory only speeds up copies to an accelerator; on the CPU torch just warns.
            training_args.dataloader_pin_memory = False
        # --prediction_loss_only: the loss (and perplexity) alone, as in the Hugging Face examples; no logits kept.
        metrics = {} if training_args.prediction_loss_only else {
            "compute_metrics": accuracy, "preprocess_logits_for_metrics": accuracy.preprocess_logits}
        super().__init__(*args, **metrics, **kwargs)
        # The loss counts the positions it predicts: a causal LM's first label predicts nothing. The
        # Trainer knows that only for models whose loss_type is causal (GPT-2's is unset).
        self._loss_shifts_labels = accuracy.shift
        self.accuracy = accuracy
        self.run = run
        self.checkpoint_staging: str | None = None  # set while a checkpoint is written (utils/train/checkpointing.py)
        config = self.args.amp_config  # None: plain fp32, the Trainer's own precision handling
        self.precision = MixedPrecision(self, config) if config is not None else None
        self.packed_documents = packed_documents
        self.loss_sum: TokenLossSum | None = None  # set while an evaluation sums its loss token by token
        # Masked LMs' and XLNet's head at the labelled positions only, unless --head_at_every_position.
        self.labelled_positions = None if self.args.head_at_every_position else LabelledPositions.of(self.model)
        # Resolved once, so that training_args.bin says what ran; the sum needs the scores, which it does not keep.
        self.args.loss_chunk_size = loss_chunk_size(self.args, self.model, causal=accuracy.shift,
                                                    scores_needed=self._sums_loss(self.eval_dataset))
        if self.args.loss_chunk_size:
            padding = VocabPadding.of(self.model)
            self.compute_loss_func = ChunkedLoss(self.model.get_output_embeddings(), self.args.loss_chunk_size,
                                                 shift=accuracy.shift, vocabulary=padding.true if padding else None)
        logger.info("Loss: %s", self.describe_loss())
        if self.model_accepts_loss_kwargs:  # the Trainer then leaves gradient accumulation to the model's loss
            weigh_loss_by_num_items(self.model, shift=accuracy.shift)
        # tokens_per_sample: mean tokens in a training sample (the block size when packed), for tokens/s and MFU.
        self.speed = SpeedCallback(self.args.fps_warmup_steps, tokens_per_sample, device_name(self.args.device.type))
        scaler_skips = self.precision is not None and self.precision.config.skips_overflowing_steps
        self.loss_tally = LossTally(self)
        for callback in (self.loss_tally, self.speed, PreemptionCallback(),
                         NonFiniteLossCallback(self.loss_tally, self.args.on_nonfinite_loss, scaler_skips=scaler_skips)):
            self.add_callback(callback)
        for make_callback in LAUNCHER_CALLBACKS:
            self.add_callback(make_callback(self))
        # First of all callbacks: the run setup is logged before the progress bar starts.
        self.report = ReportCallback(self.describe_run, self.describe_start)
        self.callback_handler.callbacks.insert(0, self.report)
        setup_sharding(self)  # --fsdp on CPU processes too, and what each process holds

    def _sums_loss(self, dataset) -> bool:
        """Whether the evaluation of ``dataset`` sums its loss token by token (see the class doc)."""
        return dataset is not None and (
            self.packed_documents or (isinstance(dataset, ScoredWindows) and not dataset.uniform))

    def describe_loss(self) -> str:
        """Where the output head runs and how the loss is computed, in words, for the log."""
        head = ("the head at the labelled positions only (--head_at_every_position: everywhere)"
                if self.labelled_positions is not None else "the model's head")
        chunk = self.args.loss_chunk_size
        return f"{head}, " + (f"the output layer and cross-entropy {chunk} tokens at a time (--loss_chunk_size)"
                              if chunk else "the model's own cross-entropy")

    def describe_run(self) -> dict:
        """run_info.json: the setup as this trainer runs it (utils/report/run_info.py)."""
        precision = self.precision.report() if self.precision else precision_report(None)
        optim = getattr(self.args.optim, "value", self.args.optim)
        optimizer = None if self.optimizer is None else {
            "optimizer": {"name": optim, "implementation": implementation(self.optimizer)}}
        return run_info(self.args, precision, optimizer)

    def describe_start(self) -> str:
        """How training starts in the run folder, for the run setup."""
        return self.run.describe_start() if self.run is not None else "fresh start"

    # ---------------------------------------------------------------- mixed precision

    def create_optimizer(self, model=None):
        if self.precision is None or self.optimizer is not None:
            optimizer = super().create_optimizer(model)
            fit_npu_fused_optimizer(self.model, optimizer, getattr(self.args.optim, "value", self.args.optim))
            return optimizer
        self.optimizer = self.precision.create_optimizer(self.model if model is None else model)
        return self.optimizer

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # Used for the training forward and in prediction_step: evaluation runs in the training precision.
        context = self.precision.autocast() if self.precision is not None else None
        return context if context is not None else super().autocast_smart_context_manager(cache_enabled)

    def _clip_grad_norm(self, model):
        if self.precision is None:
            return super()._clip_grad_norm(model)
        return self.precision.clip_grad_norm(self.args.max_grad_norm)  # unscaled master grads; inf on overflow

    def _get_grad_norm(self, model, grad_norm=None):
        if self.precision is not None and grad_norm is None:
            grad_norm = self.precision.clip_grad_norm(math.inf)  # the norm only (no --max_grad_norm)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        padding = VocabPadding.of(self.model)  # saved at the true vocabulary (utils/model/vocab_padding.py)
        own_weights = state_dict is None and self.precision is not None
        if own_weights:
            state_dict = self.precision.weights_to_save()
        if padding is not None:
            state_dict = padding.cut(self.model.state_dict() if state_dict is None else state_dict)
        with padding.true_size(self.model.config) if padding is not None else contextlib.nullcontext():
            super()._save(output_dir, state_dict)
            if own_weights and self.args.should_save:
                # save_pretrained wrote the model's own dtype (half under O2/O3) into config.json.
                self.model.config.dtype = str(self.precision.weights_dtype).removeprefix("torch.")
                self.model.config.save_pretrained(output_dir or self.args.output_dir)

    # ---------------------------------------------------------------- loss, logs, evaluation

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.get("labels")  # before label smoothing takes them out of the batch
        summing = self.loss_sum is not None and not model.training and labels is not None
        if summing:
            inputs = {k: v for k, v in inputs.items() if k != "skip_logits"}  # liger's: the sum needs the scores
        if self.labelled_positions is None or labels is None:
            if not summing:
                return self._model_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = self._model_loss(model, inputs, True, num_items_in_batch)
            self.loss_sum.observe(outputs["logits"], labels, self.accelerator.gather_for_metrics)
            return (loss, outputs) if return_outputs else loss
        with self.labelled_positions.labelled_only(inputs) as labelled:
            kept = labelled["labels"]  # the Trainer pops them for a compute_loss_func
            loss, outputs = self._model_loss(model, labelled, True, num_items_in_batch)
        if summing:
            self.loss_sum.observe_labelled(outputs.logits, kept, labels, self.accelerator.gather_for_metrics)
        if not return_outputs:
            return loss
        # Evaluation: argmax ids in the batch's shape, for the accuracy.
        outputs.logits = self.labelled_positions.spread(outputs.logits, kept, labels)
        return loss, outputs

    def _model_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        if not isinstance(self.compute_loss_func, ChunkedLoss):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with hidden_states_out(self.compute_loss_func.head):  # the model stops at its hidden states
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.loss_tally.observe(super().training_step(model, inputs, num_items_in_batch))

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        mean = self.loss_tally.mean_train_loss()  # over the steps taken, resumed attempts included
        output.metrics["train_loss"] = mean
        return output._replace(training_loss=mean)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # tokens/s (and the fp16 loss scale) beside loss and lr, for the progress bar and TensorBoard
            logs.update(self.speed.since_last_log(self.args))
            if self.precision is not None:
                logs.update(self.precision.logs())
            self.loss_tally.fix_log(logs)
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
        self.accuracy.reset()  # an interrupted earlier evaluation must not leak its counts
        dataset = getattr(dataloader, "dataset", None)
        windows = dataset if isinstance(dataset, ScoredWindows) else None
        self.loss_sum = TokenLossSum(shift=self.accuracy.shift) if self._sums_loss(dataset) else None
        try:
            output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
            if self.loss_sum is not None:
                expected = windows.scored_tokens if windows is not None else None  # each token scored once
                output.metrics[f"{metric_key_prefix}_loss"] = self.loss_sum.mean(expected)
        finally:
            self.loss_sum = None
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
            if windows is not None:
                output.metrics.update({f"{metric_key_prefix}_{name}": value
                                       for name, value in windows.figures(loss).items()})
        return output

    # ---------------------------------------------------------------- loaders and checkpoints

    def get_train_dataloader(self):
        return workers_ignore_stops(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return workers_ignore_stops(super().get_eval_dataloader(eval_dataset))

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        if self.is_world_process_zero():
            save_results(self.args.output_dir, split, metrics, combined)

    def _get_output_dir(self, trial) -> str:
        return self.checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.state.stateful_callbacks[STATE_KEY] = self.loss_tally.checkpoint_state()  # on every process
        save_checkpoint(self, lambda: super(LMTrainer, self)._save_checkpoint(model, trial),
                        self._get_output_dir(trial))
