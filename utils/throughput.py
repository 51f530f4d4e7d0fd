"""Training speed as the reference runs report it: samples/s over all devices after a warm-up.

The Trainer's own ``train_samples_per_second`` divides by the whole run time, start-up, first
steps (kernel selection, compilation, allocator growth) and checkpoint saves included. Here the
clock starts after ``--fps_warmup_steps`` optimizer steps and pauses for checkpoints and evaluations.
"""

import logging
import time

import torch
from transformers import TrainerCallback

from .device import peak_flops
from .reporting import effective_batch_size

logger = logging.getLogger(__name__)


def _synchronize() -> None:
    # Kernels run asynchronously: wait for them so the timestamps mean what they say.
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention (fwd + bwd).

    N counts every parameter once (tied embeddings once); the same approximation as in the
    PaLM paper's model-FLOPs-utilization definition.
    """
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0) or 0
    width = getattr(config, "hidden_size", 0) or 0
    return 6.0 * n_params + 12.0 * layers * width * seq_len


class ThroughputCallback(TrainerCallback):
    """Times the optimizer steps after the warm-up, excluding checkpoint saves and evaluations."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.on_train_begin()

    def on_train_begin(self, *args, **kwargs):
        self.steps_seen = 0  # in this process: a resumed run warms up again
        self.start = time.perf_counter() if self.warmup_steps == 0 else None
        self.end = self.pause_began = None
        self.save_pending = False
        self.timed_steps = 0
        self.paused = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_seen += 1
        if self.start is None:
            if self.steps_seen == self.warmup_steps:
                _synchronize()
                self.start = time.perf_counter()
            return
        self.timed_steps += 1
        if control.should_save or control.should_evaluate:
            _synchronize()
            self.pause_began = time.perf_counter()
            self.save_pending = control.should_save

    def on_evaluate(self, args, state, control, **kwargs):
        if not self.save_pending:  # a save follows an evaluation in the same step
            self._resume_clock()

    def on_save(self, args, state, control, **kwargs):
        self._resume_clock()

    def _resume_clock(self):
        if self.pause_began is not None:
            self.paused += time.perf_counter() - self.pause_began
            self.pause_began = None
            self.save_pending = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.timed_steps:
            _synchronize()
            self.end = time.perf_counter()

    def metrics(self, args, model, tokens_per_sample: float | None) -> dict:
        """fps, and with tokens per sample also tokens/s and (where the peak is known) MFU.

        The attention term of the FLOPs takes the mean sample length as the sequence length.
        """
        if self.end is None:
            logger.warning("Too few steps to measure FPS after %d warm-up steps", self.warmup_steps)
            return {}
        seconds = self.end - self.start - self.paused
        if seconds <= 0:
            return {}
        result = {"fps": round(self.timed_steps * effective_batch_size(args) / seconds, 3), "fps_warmup_steps": self.warmup_steps}
        if tokens_per_sample:
            tokens_per_second = result["fps"] * tokens_per_sample
            result["fps_tokens_per_second"] = round(tokens_per_second, 3)
            peak = peak_flops()
            if peak:
                achieved = tokens_per_second * flops_per_token(model, tokens_per_sample)
                result["mfu"] = round(achieved / (peak * args.world_size), 4)
        return result
